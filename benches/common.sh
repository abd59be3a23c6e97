# Shared by the shell benches (sourced): a free port on 127.0.0.1, and the configuration of
# one ferry module "m" and of a sender whose one group "m" pushes to it.

# A port on 127.0.0.1 free right now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# receiver_toml FILE PORT MODULE_DIR CLIENT_FINGERPRINT [MODULE_KEYS]: a receiver listening on
# 127.0.0.1:PORT whose writable module m at MODULE_DIR takes CLIENT, with MODULE_KEYS (lines)
# beside.
receiver_toml() {
    cat > "$1" <<T
listen = "127.0.0.1:$2"
cert = "cert.pem"
key = "key.pem"
[modules.m]
path = "$3"
clients = ["$4"]
read_only = false
${5:-}
T
}

# sender_toml FILE PORT RECEIVER_FINGERPRINT SOURCE [GROUP_KEYS] [TOP_KEYS]: a sender whose
# group m pushes SOURCE to module m of 127.0.0.1:PORT, with GROUP_KEYS (lines) in the group
# and TOP_KEYS before the target.
sender_toml() {
    cat > "$1" <<T
cert = "cert.pem"
key = "key.pem"
${6:-}
[targets.b]
address = "127.0.0.1:$2"
fingerprint = "$3"
[[sync]]
name = "m"
source = "$4"
targets = ["b"]
module = "m"
${5:-}
T
}
