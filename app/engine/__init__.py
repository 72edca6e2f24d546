"""What runs requests: the scheduler, the backend pool, the weighted queues, expiry
and progress polling."""
