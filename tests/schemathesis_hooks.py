"""Schemathesis hooks for the OpenAPI run (loaded through SCHEMATHESIS_HOOKS).

OpenAPI 3.0 cannot say that mix2img's `images_texts` holds a text, two base64 images and a
text in that order (the document says so in words). Random strings in the image positions
would be refused, rightly, so generated mix2img requests get real images there; every other
part of the request is left as generated.
"""

import base64

import schemathesis

TINY_JPEG = base64.b64encode(bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300080606070605080707070909080a0c140d0c0b0b0c"
    "1912130f141d1a1f1e1d1a1c1c20242e2720222c231c1c2837292c30313434341f27393d38323c2e333432ffc0000b"
    "080001000101011100ffc4001f0000010501010101010100000000000000000102030405060708090a0bffc400b510"
    "0002010303020403050504040000017d01020300041105122131410613516107227114328191a1082342b1c11552d1"
    "f02433627282090a161718191a25262728292a3435363738393a434445464748494a535455565758595a6364656667"
    "68696a737475767778797a838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2"
    "c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffda0008010100003f00"
    "fbd3ffd9")).decode()


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict) and body.get("gen_type") == "mix2img":
        payload = body.get("payload")
        items = payload.get("images_texts") if isinstance(payload, dict) else None
        if isinstance(items, list) and len(items) == 4 and all(isinstance(i, str) for i in items[1:3]):
            items[1] = items[2] = TINY_JPEG
    return body
