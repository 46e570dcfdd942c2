"""Run by tests/test_extract_features.py: extract_features.py as users run it, plus a record of
which rank encoded which images and wrote which shards (EXTRACT_SPY_DIR/rank<R>.jsonl)."""

import json
import os

import extract_features
from tinyfusion import extraction


def main() -> None:
    record = os.path.join(os.environ["EXTRACT_SPY_DIR"], f"rank{os.environ.get('RANK', '0')}.jsonl")
    encode_copies, write_shard = extraction.encode_copies, extraction.write_shard

    def log(**event) -> None:
        with open(record, "a") as f:
            f.write(json.dumps(event) + "\n")

    def spy_encode(codec, images, indices, *args, **kwargs):
        log(encoded=[int(i) for i in indices])
        return encode_copies(codec, images, indices, *args, **kwargs)

    def spy_write(root, shard_id, latents, labels):
        log(shard=shard_id)
        write_shard(root, shard_id, latents, labels)

    extraction.encode_copies, extraction.write_shard = spy_encode, spy_write
    extract_features.main(extract_features.parse_args())


if __name__ == "__main__":
    main()
