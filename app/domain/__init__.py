"""What a request is, independent of how it travels or is stored: jobs and their life
cycle, costs, ids, errors, and the payload contracts of the backends."""
