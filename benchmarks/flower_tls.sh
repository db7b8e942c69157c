#!/usr/bin/env bash
# zorba-edge's Flower app on loopback with TLS and SuperNode authentication (flwr 1.42):
#
#     bash benchmarks/flower_tls.sh [WORKDIR]
#
# 1. a CA and a SuperLink certificate for 127.0.0.1 (openssl), one ECDSA P-384 key pair per
#    SuperNode (ssh-keygen, as Flower's guides do), and a third key pair that is never
#    registered;
# 2. a SuperLink with TLS and --enable-supernode-auth; the two SuperNodes' public keys are
#    registered with `flwr supernode register` (1.42: the SuperLink's --auth-list-public-keys
#    is deprecated); two SuperNodes with the CA and their private keys, and a third with the
#    unregistered key (it must be refused);
# 3. `flwr run` of flower_app/ on the tiny random model of the tests, 2 rounds; waits until the
#    server app's checkpoint says 2 applied rounds.
# Prints what it saw; every process it starts is stopped by its process group (its pid).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN="$REPO/.venv/bin"
WORK=${1:-$(mktemp -d /tmp/zorba-flower-tls-XXXXXX)}
mkdir -p "$WORK"
cd "$WORK"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_HOME="$WORK/flwr-home"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PATH="$BIN:$PATH"
mkdir -p "$FLWR_HOME"

free_port() { "$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
LINK=$(free_port)

PIDS=()
stop_all() {
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    sleep 2
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap stop_all EXIT
start() {  # start NAME CMD...: its own session, so its pid is its process group
    local name=$1; shift
    setsid "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
}

# ---- 1. certificates and keys
openssl req -x509 -newkey rsa:4096 -nodes -days 30 -subj "/CN=zorba-flower-test-ca" \
    -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:4096 -nodes -subj "/CN=127.0.0.1" -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName = IP:127.0.0.1, DNS:localhost\n' >server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
    -extfile server.ext -out server.crt 2>/dev/null
for n in 1 2 3; do ssh-keygen -q -t ecdsa -b 384 -N "" -f "node$n" -C "zorba-node$n"; done

# ---- the tiny model and its data, as the tests build them
(cd "$REPO/tests" && "$BIN/python" -c "import sys, pathlib; from client_support import make_world
make_world(pathlib.Path(sys.argv[1]))" "$WORK/world") 2>/dev/null

cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "tls"

[superlink.tls]
address = "127.0.0.1:$LINK"
root-certificates = "$WORK/ca.crt"
EOF

# ---- 2. SuperLink, registration, SuperNodes
start superlink "$BIN/flower-superlink" --host 127.0.0.1 --port "$LINK" \
    --ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key \
    --enable-supernode-auth --database "$WORK/superlink.db" --disable-runtime-dependency-installation
sleep 6
for n in 1 2; do "$BIN/flwr" supernode register "node$n.pub" tls --name "node$n"; done
"$BIN/flwr" supernode list tls

BUDGETS=(0 0.2282 0.2636)  # MiB: the tiny model's fixed part + one block, + both blocks
for n in 1 2; do
    start "supernode$n" "$BIN/flower-supernode" --superlink "127.0.0.1:$LINK" \
        --root-certificates ca.crt --auth-supernode-private-key "node$n" \
        --host 127.0.0.1 --port "$(free_port)" \
        --node-config "partition-id=$((n - 1)) num-partitions=2 budget-mib=${BUDGETS[$n]}"
done
start supernode3 "$BIN/flower-supernode" --superlink "127.0.0.1:$LINK" \
    --root-certificates ca.crt --auth-supernode-private-key node3 \
    --host 127.0.0.1 --port "$(free_port)" --node-config "partition-id=0 num-partitions=2"
sleep 8

# ---- 3. the app, 2 rounds
CKPT="$WORK/zorba.ckpt"
"$BIN/flwr" run "$REPO/flower_app" tls --run-config "client.model=\"$WORK/world/model\" \
client.data=\"$WORK/world/data.jsonl\" flower.checkpoint=\"$CKPT\" run.max-rounds=2 run.min-clients=2 \
run.pool-size=16 run.batch-size=2 run.seq-len=16 run.round-duration-s=90.0 run.memory-headroom=0.0 \
client.frozen-dtype=\"fp32\" client.runtime-mib=0.0 client.report-peak-memory=false \
flower.rounds-log=\"$WORK/rounds.jsonl\""
started=$(date +%s)
version() {
    "$BIN/python" -c "import msgpack,sys
try: print(msgpack.unpackb(open(sys.argv[1],'rb').read(), raw=False, strict_map_key=False)['version'])
except Exception: print(0)" "$CKPT"
}
until [ "$(version)" -ge 2 ]; do
    if [ $(($(date +%s) - started)) -gt 600 ]; then echo "timed out waiting for 2 rounds"; exit 1; fi
    sleep 2
done
echo "applied rounds: $(version) in $(($(date +%s) - started)) s after flwr run"
"$BIN/python" -c "import json,sys
for line in open(sys.argv[1]): r=json.loads(line); print('round', r['round'], r['status'], 'wall', round(r['wall_s'],1), 's, assigned', r['assigned'])" "$WORK/rounds.jsonl"
echo "--- the unregistered SuperNode (node3):"
grep -iE "error|denied|unauth|fail|permission" "$WORK/supernode3.log" | head -5 || echo "(nothing logged)"
echo "work dir: $WORK"
