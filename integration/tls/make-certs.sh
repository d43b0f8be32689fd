#!/bin/bash
# Makes throwaway TLS credentials in QEMU's tls-creds-x509 layout, for tests
# and for README's example. Never use them in production.
#
#   make-certs.sh OUTDIR [SERVER_NAME]
#
# OUTDIR/server/   ca-cert.pem server-cert.pem server-key.pem   (secondary, qemu-nbd endpoint=server)
# OUTDIR/client/   ca-cert.pem client-cert.pem client-key.pem   (primary, qemu-img endpoint=client)
# OUTDIR/other-ca/ ca-cert.pem client-*.pem server-*.pem         (a second CA, and a client and server it signed)
# OUTDIR/expired/  ca-cert.pem client-cert.pem client-key.pem   (client certificate already expired)
# OUTDIR/nocert/   ca-cert.pem                                  (a client without a certificate)
# OUTDIR/intruder/ ca-cert.pem client-cert.pem client-key.pem   (trusted CA, identity CN=intruder)
#
#
# Pre-shared keys (QEMU's tls-creds-psk dir=, or colo-blk --tls-creds-psk):
# OUTDIR/psk/keys.psk            primary:KEY1 intruder:KEY2  (secondary, qemu-nbd endpoint=server)
# OUTDIR/psk-client/keys.psk     primary:KEY1                (primary, username=primary)
# OUTDIR/psk-wrongkey/keys.psk   primary:KEY3                (the right name, another key)
# OUTDIR/psk-unknown/keys.psk    stranger:KEY4               (a name the server does not know)
# OUTDIR/psk-intruder/keys.psk   intruder:KEY2               (known to the server, not authorised)
#
# Identities (as QEMU and colo-blk --tls-authz render them):
#   client:   C=GB,O=Example,CN=client
#   intruder: C=GB,O=Example,CN=intruder
#   PSK:      primary (intruder: the name to leave out of --tls-authz)
# The server certificate carries DNS:localhost, DNS:SERVER_NAME (default
# secondary.example) and IP:127.0.0.1, IP:::1.
set -euo pipefail
out=${1:?usage: make-certs.sh OUTDIR [SERVER_NAME]}
name=${2:-secondary.example}
mkdir -p "$out"
cd "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
umask 077

ca() { # DIR SUBJECT
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$tmp/$1-ca-key.pem" -out "$tmp/$1-ca-cert.pem" -days 3650 \
        -subj "$2" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}
leaf() { # CA OUTCERT OUTKEY SUBJECT EXT DAYS_ARGS...
    local ca=$1 cert=$2 key=$3 subj=$4 ext=$5
    shift 5
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$key" \
        -out "$tmp/req.csr" -subj "$subj" 2>/dev/null
    printf '%s\n' "$ext" > "$tmp/ext.cnf"
    openssl x509 -req -in "$tmp/req.csr" -CA "$tmp/$ca-ca-cert.pem" -CAkey "$tmp/$ca-ca-key.pem" \
        -CAcreateserial -out "$cert" -extfile "$tmp/ext.cnf" "$@" 2>/dev/null
}
client_ext="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
server_ext="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,DNS:$name,IP:127.0.0.1,IP:::1"

ca main "/C=GB/O=Example/CN=Example test CA"
ca other "/C=GB/O=Elsewhere/CN=Untrusted CA"
mkdir -p server client other-ca expired nocert intruder
for d in server client expired nocert intruder; do cp "$tmp/main-ca-cert.pem" "$d/ca-cert.pem"; done
cp "$tmp/other-ca-cert.pem" other-ca/ca-cert.pem
leaf main server/server-cert.pem server/server-key.pem "/C=GB/O=Example/CN=$name" "$server_ext" -days 3650
leaf main client/client-cert.pem client/client-key.pem "/C=GB/O=Example/CN=client" "$client_ext" -days 3650
leaf main intruder/client-cert.pem intruder/client-key.pem "/C=GB/O=Example/CN=intruder" "$client_ext" -days 3650
leaf other other-ca/server-cert.pem other-ca/server-key.pem "/C=GB/O=Elsewhere/CN=$name" "$server_ext" -days 3650
leaf other other-ca/client-cert.pem other-ca/client-key.pem "/C=GB/O=Example/CN=client" "$client_ext" -days 3650
# Valid from 2000 to 2001: long expired.
leaf main expired/client-cert.pem expired/client-key.pem "/C=GB/O=Example/CN=client" "$client_ext" \
    -not_before 20000101000000Z -not_after 20010101000000Z 2>/dev/null || {
    # openssl < 3.4 has no -not_before: sign with a backdated clock via -days 0 is impossible,
    # so fall back to 'openssl ca' with explicit dates.
    mkdir -p "$tmp/ca" && touch "$tmp/ca/index.txt" && echo 01 > "$tmp/ca/serial"
    cat > "$tmp/ca.cnf" <<CNF
[ca]
default_ca = d
[d]
dir = $tmp/ca
database = \$dir/index.txt
serial = \$dir/serial
new_certs_dir = \$dir
default_md = sha256
policy = p
[p]
commonName = supplied
[x]
$client_ext
CNF
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout expired/client-key.pem \
        -out "$tmp/exp.csr" -subj "/C=GB/O=Example/CN=client" 2>/dev/null
    openssl ca -batch -config "$tmp/ca.cnf" -cert "$tmp/main-ca-cert.pem" -keyfile "$tmp/main-ca-key.pem" \
        -in "$tmp/exp.csr" -out expired/client-cert.pem -startdate 20000101000000Z \
        -enddate 20010101000000Z -extensions x -preserveDN -notext 2>/dev/null
}
# keys.psk as psktool -u NAME -p FILE writes it: NAME:HEXKEY, 32 random bytes.
psk() { openssl rand -hex 32; }
k1=$(psk) k2=$(psk)
mkdir -p psk psk-client psk-wrongkey psk-unknown psk-intruder
printf 'primary:%s\nintruder:%s\n' "$k1" "$k2" > psk/keys.psk
printf 'primary:%s\n' "$k1" > psk-client/keys.psk
printf 'primary:%s\n' "$(psk)" > psk-wrongkey/keys.psk
printf 'stranger:%s\n' "$(psk)" > psk-unknown/keys.psk
printf 'intruder:%s\n' "$k2" > psk-intruder/keys.psk
chmod 600 ./psk*/keys.psk
chmod 600 ./*/*-key.pem
chmod 644 ./*/*-cert.pem
echo "credentials in $(pwd)"
