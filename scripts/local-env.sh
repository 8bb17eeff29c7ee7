# shellcheck shell=bash
# Emulator-only accounts and keys for Azurite, the demo and the tests. These keys
# protect nothing: they exist only inside a local Azurite. Never use them in Azure.
export AZURITE_BLOB_PORT="${AZURITE_BLOB_PORT:-10000}"
export AZURITE_QUEUE_PORT="${AZURITE_QUEUE_PORT:-10001}"
export VHDREP_KEY_OPS="b3BzLWxvY2FsLWF6dXJpdGUta2V5LW9ubHktZm9yLXRlc3RzLW5vdC1hLXNlY3JldC0wMDAw"
export VHDREP_KEY_SRC="c3JjLWxvY2FsLWF6dXJpdGUta2V5LW9ubHktZm9yLXRlc3RzLW5vdC1hLXNlY3JldC0wMDAw"
export VHDREP_KEY_DST1="ZHN0MS1sb2NhbC1henVyaXRlLWtleS1vbmx5LWZvci10ZXN0cy1ub3QtYS1zZWNyZXQtMDA="
export VHDREP_KEY_DST2="ZHN0Mi1sb2NhbC1henVyaXRlLWtleS1vbmx5LWZvci10ZXN0cy1ub3QtYS1zZWNyZXQtMDA="
export VHDREP_KEY_DST3="ZHN0My1sb2NhbC1henVyaXRlLWtleS1vbmx5LWZvci10ZXN0cy1ub3QtYS1zZWNyZXQtMDA="
export AZURITE_ACCOUNTS="ops:${VHDREP_KEY_OPS};src:${VHDREP_KEY_SRC};dst1:${VHDREP_KEY_DST1};dst2:${VHDREP_KEY_DST2};dst3:${VHDREP_KEY_DST3}"
