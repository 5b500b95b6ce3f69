#!/usr/bin/env bash
# Prints the SPIRE server configuration the comparisons in BENCHMARKS.md run
# with: sqlite3 under $1 (the data dir; the admin socket is $1/s/api.sock),
# the agent API on 127.0.0.1:${2:-18981}, the disk KeyManager, an ec-p256
# CA, 24 h SVIDs, join-token attestation, and the rate limits off: they are
# per IP, and every simulated agent and load client is on 127.0.0.1.
set -euo pipefail
D=$1
cat <<CONF
server {
    bind_address = "127.0.0.1"
    bind_port = "${2:-18981}"
    socket_path = "$D/s/api.sock"
    trust_domain = "cluster.local"
    data_dir = "$D/data"
    log_level = "WARN"
    ca_key_type = "ec-p256"
    ca_ttl = "8760h"
    default_x509_svid_ttl = "24h"
    ratelimit {
        attestation = false
        signing = false
    }
}
plugins {
    DataStore "sql" { plugin_data { database_type = "sqlite3"
        connection_string = "$D/data/datastore.sqlite3" } }
    NodeAttestor "join_token" { plugin_data {} }
    KeyManager "disk" { plugin_data { keys_path = "$D/data/keys.json" } }
}
CONF
