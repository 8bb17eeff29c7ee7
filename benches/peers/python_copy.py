"""What an operator writes by hand: every replica with start_copy_from_url from the
source (a read-only SAS on it), a thread pool, polling until done.

usage: python_copy.py SRC_ACCOUNT SRC_CONTAINER SRC_BLOB DEST_CONTAINER REPLICAS ACCOUNT[,ACCOUNT...]
Keys come from VHDREP_KEY_<ACCOUNT>; endpoints are Azurite's path-style URLs.
"""
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas

BLOB = "http://127.0.0.1:10000"


def client(account):
    key = os.environ["VHDREP_KEY_" + account.upper()]
    return BlobServiceClient(f"{BLOB}/{account}", credential={"account_name": account, "account_key": key})


def main():
    src_account, src_container, src_blob, dest_container, replicas, accounts = sys.argv[1:7]
    accounts = accounts.split(",")
    sas = generate_blob_sas(
        account_name=src_account,
        container_name=src_container,
        blob_name=src_blob,
        account_key=os.environ["VHDREP_KEY_" + src_account.upper()],
        permission=BlobSasPermissions(read=True),
        start=datetime.now(timezone.utc) - timedelta(minutes=15),
        expiry=datetime.now(timezone.utc) + timedelta(hours=2),
    )
    source_url = f"{BLOB}/{src_account}/{src_container}/{src_blob}?{sas}"
    clients = {a: client(a) for a in accounts}
    for a in accounts:
        try:
            clients[a].create_container(dest_container)
        except Exception:
            pass

    def copy(i):
        account = accounts[i % len(accounts)]
        blob = clients[account].get_blob_client(dest_container, f"replica-{i:04d}.vhd")
        blob.start_copy_from_url(source_url)
        while True:
            status = blob.get_blob_properties().copy.status
            if status == "success":
                return f"{account}/{dest_container}/replica-{i:04d}.vhd"
            if status in ("failed", "aborted"):
                raise RuntimeError(f"copy {i} {status}")
            time.sleep(0.5)

    with ThreadPoolExecutor(max_workers=int(replicas)) as pool:
        for done in pool.map(copy, range(int(replicas))):
            print(done)


if __name__ == "__main__":
    main()
