"""Checks replicas against their source: same length, same footer, same bytes in
the first MiB, the last MiB and three random MiB ranges.

usage: check_replicas.py SRC_ACCOUNT/CONTAINER/BLOB ACCOUNT/CONTAINER/BLOB...
"""
import os
import random
import sys

from azure.storage.blob import BlobServiceClient

BLOB = "http://127.0.0.1:10000"
MIB = 1024 * 1024


def blob(path):
    account, container, name = path.split("/", 2)
    key = os.environ["VHDREP_KEY_" + account.upper()]
    svc = BlobServiceClient(f"{BLOB}/{account}", credential={"account_name": account, "account_key": key})
    return svc.get_blob_client(container, name)


def main():
    source = blob(sys.argv[1])
    length = source.get_blob_properties().size
    rng = random.Random(7)
    ranges = [(0, MIB), (length - MIB, MIB)] + [(rng.randrange(0, length - MIB), MIB) for _ in range(3)]
    expected = [source.download_blob(offset=o, length=n).readall() for o, n in ranges]
    bad = 0
    types = set()
    for path in sys.argv[2:]:
        b = blob(path)
        props = b.get_blob_properties()
        types.add(str(props.blob_type).split(".")[-1])
        ok = props.size == length and all(
            b.download_blob(offset=o, length=n).readall() == e for (o, n), e in zip(ranges, expected)
        )
        if not ok:
            bad += 1
            print(f"MISMATCH {path} ({props.size} bytes, {props.blob_type})")
    print(f"checked {len(sys.argv) - 2} replicas: {bad} bad; blob types: {', '.join(sorted(types))}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
