"""Creates a container (if needed) and prints a container SAS URL for it, the way
rclone 1.60 reaches path-style (Azurite) endpoints.

usage: container_sas.py ACCOUNT CONTAINER PERMISSIONS
"""
import os
import sys
from datetime import datetime, timedelta, timezone

from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

BLOB = "http://127.0.0.1:10000"


def main():
    account, container, permissions = sys.argv[1:4]
    key = os.environ["VHDREP_KEY_" + account.upper()]
    svc = BlobServiceClient(f"{BLOB}/{account}", credential={"account_name": account, "account_key": key})
    try:
        svc.create_container(container)
    except Exception:
        pass
    sas = generate_container_sas(
        account_name=account,
        container_name=container,
        account_key=key,
        permission=ContainerSasPermissions.from_string(permissions),
        start=datetime.now(timezone.utc) - timedelta(minutes=15),
        expiry=datetime.now(timezone.utc) + timedelta(hours=2),
    )
    print(f"{BLOB}/{account}/{container}?{sas}")


if __name__ == "__main__":
    main()
