//! TLS record protection for an established session, done here rather than
//! by rustls, as kTLS would do it in the kernel: rustls runs the handshake
//! and keeps the traffic secrets (key updates, session tickets: its
//! `kernel` API), this seals and opens the records with ring's AEADs.
//!
//! Why: rustls' buffered API copies every plaintext byte twice on the way
//! out (into a fresh record, then into the caller's buffer) and twice on the
//! way in, with a heap allocation per 16 KiB record. A 1 MiB NBD write then
//! costs as much in copies and page faults as in AES-GCM. Here a record is
//! built in place: the plaintext is copied once from guest memory into the
//! outgoing buffer and sealed there; an incoming record is opened in the
//! buffer it was read into.
//!
//! Record formats (RFC 8446 §5.2, RFC 5288, RFC 7905), AEAD suites only:
//! * TLS 1.3: header (type 23, version 0x0303, length), then
//!   `seal(plaintext || content type)`; nonce `iv ^ seq`; the header is the
//!   additional data.
//! * TLS 1.2 AES-GCM: header, 8-byte explicit nonce, `seal(plaintext)`;
//!   nonce `iv[..4] || explicit` (we send `iv[4..] ^ seq`, as rustls does).
//! * TLS 1.2 ChaCha20-Poly1305: header, `seal(plaintext)`; nonce `iv ^ seq`.
//!
//! In TLS 1.2 the additional data is `seq || type || version || length`.

use ring::{aead, hkdf};
use rustls::ConnectionTrafficSecrets;
use std::io;
use std::ops::Range;

/// Bytes of a record header.
pub(super) const HEADER: usize = 5;
/// The most plaintext one record carries (RFC 8446 §5.1).
pub(super) const MAX_PLAIN: usize = 16384;
/// The largest record body a peer may send: TLS 1.2 allows 2048 bytes of
/// expansion (RFC 5246 §6.2.3), TLS 1.3 256 (RFC 8446 §5.2).
pub(super) const MAX_BODY: usize = MAX_PLAIN + 2048;
const TAG: usize = 16;
const EXPLICIT_NONCE: usize = 8;

/// Content types (RFC 8446 §5.1).
pub(super) const CHANGE_CIPHER_SPEC: u8 = 20;
pub(super) const ALERT: u8 = 21;
pub(super) const HANDSHAKE: u8 = 22;
pub(super) const APPLICATION_DATA: u8 = 23;

/// The protocol version the handshake agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Version {
    Tls12,
    Tls13,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cipher {
    Gcm,
    ChaCha,
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// One direction's key: seals records (ours) or opens them (the peer's), in
/// sequence order.
pub(super) struct RecordKey {
    key: aead::LessSafeKey,
    iv: [u8; 12],
    cipher: Cipher,
    version: Version,
    seq: u64,
}

impl RecordKey {
    /// The key for `secrets`, the next record being number `seq`.
    pub(super) fn new(
        version: Version,
        (seq, secrets): (u64, ConnectionTrafficSecrets),
    ) -> io::Result<RecordKey> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(io::Error::other("TLS: unsupported record cipher")),
        };
        RecordKey::from_parts(version, alg, key.as_ref(), iv.as_ref(), seq)
    }

    fn from_parts(
        version: Version,
        alg: &'static aead::Algorithm,
        key: &[u8],
        iv: &[u8],
        seq: u64,
    ) -> io::Result<RecordKey> {
        let cipher = if alg == &aead::CHACHA20_POLY1305 {
            Cipher::ChaCha
        } else {
            Cipher::Gcm
        };
        let key = aead::UnboundKey::new(alg, key)
            .map_err(|_| io::Error::other("TLS: unusable record key"))?;
        let iv: [u8; 12] = iv
            .try_into()
            .map_err(|_| io::Error::other("TLS: unusable record IV"))?;
        Ok(RecordKey {
            key: aead::LessSafeKey::new(key),
            iv,
            cipher,
            version,
            seq,
        })
    }

    /// Records sealed or opened with this key so far (its sequence number).
    pub(super) fn seq(&self) -> u64 {
        self.seq
    }

    fn nonce(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    /// Bytes between the header and the plaintext.
    fn prefix(&self) -> usize {
        match (self.version, self.cipher) {
            (Version::Tls12, Cipher::Gcm) => EXPLICIT_NONCE,
            _ => 0,
        }
    }

    /// Bytes after the plaintext: the inner content type and the tag.
    fn suffix(&self) -> usize {
        match self.version {
            Version::Tls13 => 1 + TAG,
            Version::Tls12 => TAG,
        }
    }

    /// Bytes a record carrying `plain` bytes of plaintext takes on the wire.
    pub(super) fn record_len(&self, plain: usize) -> usize {
        HEADER + self.prefix() + plain + self.suffix()
    }

    fn tls12_aad(&self, content_type: u8, plain: usize) -> [u8; 13] {
        let mut aad = [0u8; 13];
        aad[..8].copy_from_slice(&self.seq.to_be_bytes());
        aad[8] = content_type;
        aad[9..11].copy_from_slice(&[3, 3]);
        aad[11..].copy_from_slice(&(plain as u16).to_be_bytes());
        aad
    }

    /// Builds one record of `content_type` in `rec` (exactly
    /// `record_len(plain)` bytes): `fill` writes the `plain` plaintext
    /// bytes in place, then they are sealed there.
    pub(super) fn seal(
        &mut self,
        rec: &mut [u8],
        content_type: u8,
        plain: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> io::Result<()> {
        debug_assert!(plain <= MAX_PLAIN);
        debug_assert_eq!(rec.len(), self.record_len(plain));
        let body_len = rec.len() - HEADER;
        let outer = match self.version {
            Version::Tls13 => APPLICATION_DATA,
            Version::Tls12 => content_type,
        };
        rec[0] = outer;
        rec[1..3].copy_from_slice(&[3, 3]);
        rec[3..5].copy_from_slice(&(body_len as u16).to_be_bytes());
        let (header, body) = rec.split_at_mut(HEADER);
        let nonce = self.nonce();
        let prefix = self.prefix();
        if prefix > 0 {
            body[..prefix].copy_from_slice(&nonce[4..]);
        }
        fill(&mut body[prefix..prefix + plain]);
        let sealed = match self.version {
            Version::Tls13 => {
                body[plain] = content_type;
                plain + 1
            }
            Version::Tls12 => plain,
        };
        let tls12_aad;
        let aad: &[u8] = match self.version {
            Version::Tls13 => header,
            Version::Tls12 => {
                tls12_aad = self.tls12_aad(content_type, plain);
                &tls12_aad
            }
        };
        let (data, tag_out) = body[prefix..].split_at_mut(sealed);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                data,
            )
            .map_err(|_| io::Error::other("TLS: sealing a record failed"))?;
        tag_out.copy_from_slice(tag.as_ref());
        self.seq += 1;
        Ok(())
    }

    /// Opens one whole record (header and body) in place. Returns its content
    /// type and where the plaintext is in `rec`. A record that does not
    /// authenticate is an error: the session cannot go on.
    pub(super) fn open(&mut self, rec: &mut [u8]) -> io::Result<(u8, Range<usize>)> {
        let to = HEADER + self.prefix();
        let len = rec.len();
        let (ty, n) = self.open_to(rec, 0, len, to)?;
        Ok((ty, to..to + n))
    }

    /// Opens the whole record at `buf[at..at + len]`, its plaintext landing
    /// at `buf[to..]` (`to` at most where the plaintext starts in the
    /// record) in the same pass: records received back to back become their
    /// plaintext back to back. Returns the content type and the plaintext
    /// length. A record that does not authenticate is an error: the session
    /// cannot go on.
    pub(super) fn open_to(
        &mut self,
        buf: &mut [u8],
        at: usize,
        len: usize,
        to: usize,
    ) -> io::Result<(u8, usize)> {
        if len < HEADER || at + len > buf.len() {
            return Err(invalid("TLS: truncated record"));
        }
        let outer = buf[at];
        let body_len = len - HEADER;
        let prefix = self.prefix();
        if body_len < prefix + self.suffix() {
            return Err(invalid("TLS: record too short to be sealed"));
        }
        let start = at + HEADER + prefix;
        debug_assert!(to <= start);
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&buf[at..at + HEADER]);
        let mut nonce = self.nonce();
        let plain_len = body_len - prefix - TAG;
        let aad_buf;
        let aad: &[u8] = match self.version {
            Version::Tls13 => {
                if outer != APPLICATION_DATA {
                    return Err(invalid(format!(
                        "TLS: unprotected record of type {outer} after the handshake"
                    )));
                }
                &header
            }
            Version::Tls12 => {
                if prefix > 0 {
                    nonce[4..].copy_from_slice(&buf[at + HEADER..start]);
                }
                aad_buf = self.tls12_aad(outer, plain_len);
                &aad_buf
            }
        };
        let opened = self
            .key
            .open_within(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                &mut buf[to..at + len],
                start - to..,
            )
            .map_err(|_| invalid("TLS: a record failed to authenticate (bad_record_mac)"))?
            .len();
        self.seq += 1;
        match self.version {
            Version::Tls12 => Ok((outer, opened)),
            Version::Tls13 => {
                // The content type is the last non-zero byte (zeros are padding).
                let inner = &buf[to..to + opened];
                let Some(end) = inner.iter().rposition(|&b| b != 0) else {
                    return Err(invalid("TLS: record without a content type"));
                };
                Ok((inner[end], end))
            }
        }
    }
}

/// HKDF-Expand-Label(secret, label, "", out.len()) (RFC 8446 §7.1).
fn expand_label(
    hash: hkdf::Algorithm,
    secret: &[u8],
    label: &[u8],
    out: &mut [u8],
) -> io::Result<()> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let len = (out.len() as u16).to_be_bytes();
    let label_len = [(b"tls13 ".len() + label.len()) as u8];
    let info: [&[u8]; 5] = [&len, &label_len, b"tls13 ", label, &[0]];
    hkdf::Prk::new_less_safe(hash, secret)
        .expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| io::Error::other("TLS: HKDF failed"))
}

/// A TLS 1.3 application traffic secret of one direction, for sessions
/// whose handshake library hands over secrets rather than keys (GnuTLS):
/// it makes the record key and, at a key update, the next secret.
pub(super) struct TrafficSecret {
    secret: Vec<u8>,
    hash: hkdf::Algorithm,
    aead: &'static aead::Algorithm,
}

impl TrafficSecret {
    /// `secret` of a suite with `aead` and `hash` (SHA-256 or SHA-384).
    pub(super) fn new(
        secret: Vec<u8>,
        aead: &'static aead::Algorithm,
        hash: hkdf::Algorithm,
    ) -> TrafficSecret {
        TrafficSecret { secret, hash, aead }
    }

    /// The record key it makes, the next record being number `seq`.
    pub(super) fn key(&self, seq: u64) -> io::Result<RecordKey> {
        let mut key = [0u8; 32];
        let key = &mut key[..self.aead.key_len()];
        let mut iv = [0u8; 12];
        expand_label(self.hash, &self.secret, b"key", key)?;
        expand_label(self.hash, &self.secret, b"iv", &mut iv)?;
        let k = RecordKey::from_parts(Version::Tls13, self.aead, key, &iv, seq);
        key.fill(0);
        k
    }

    /// Moves to the next secret (a key update, RFC 8446 §7.2) and returns
    /// its record key.
    pub(super) fn update(&mut self) -> io::Result<RecordKey> {
        let mut next = vec![0u8; self.secret.len()];
        expand_label(self.hash, &self.secret, b"traffic upd", &mut next)?;
        self.secret.fill(0);
        self.secret = next;
        self.key(0)
    }
}

impl Drop for TrafficSecret {
    fn drop(&mut self) {
        self.secret.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(version: Version, which: u8, seq: u64) -> RecordKey {
        let (alg, len) = match which {
            0 => (&aead::AES_128_GCM, 16),
            1 => (&aead::AES_256_GCM, 32),
            _ => (&aead::CHACHA20_POLY1305, 32),
        };
        RecordKey::from_parts(version, alg, &[7u8; 32][..len], &[9u8; 12], seq).unwrap()
    }

    #[test]
    fn a_sealed_record_opens_with_the_same_key_and_sequence() {
        for version in [Version::Tls12, Version::Tls13] {
            for which in 0..3 {
                let (mut tx, mut rx) = (key(version, which, 5), key(version, which, 5));
                let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
                for round in 0..3 {
                    let mut rec = vec![0u8; tx.record_len(data.len())];
                    tx.seal(&mut rec, APPLICATION_DATA, data.len(), |p| {
                        p.copy_from_slice(&data)
                    })
                    .unwrap();
                    let (ty, range) = rx.open(&mut rec).unwrap();
                    assert_eq!(ty, APPLICATION_DATA, "{version:?} {which} {round}");
                    assert_eq!(&rec[range], &data[..]);
                }
                assert_eq!((tx.seq(), rx.seq()), (8, 8));
            }
        }
    }

    #[test]
    fn traffic_keys_derive_as_rfc_8448_says() {
        // RFC 8448 §3 ("Simple 1-RTT Handshake"): the server's application
        // traffic secret and the write key and IV derived from it.
        let hex = |s: &str| -> Vec<u8> {
            s.split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).unwrap())
                .collect()
        };
        let secret = hex("a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32 \
                          82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43");
        let mut key = [0u8; 16];
        let mut iv = [0u8; 12];
        expand_label(hkdf::HKDF_SHA256, &secret, b"key", &mut key).unwrap();
        expand_label(hkdf::HKDF_SHA256, &secret, b"iv", &mut iv).unwrap();
        assert_eq!(
            key.to_vec(),
            hex("9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56")
        );
        assert_eq!(iv.to_vec(), hex("cf 78 2b 88 dd 83 54 9a ad f1 e9 84"));
        // Both ends of a key update agree.
        let mut a = TrafficSecret::new(secret.clone(), &aead::AES_128_GCM, hkdf::HKDF_SHA256);
        let mut b = TrafficSecret::new(secret, &aead::AES_128_GCM, hkdf::HKDF_SHA256);
        let (mut tx, mut rx) = (a.update().unwrap(), b.update().unwrap());
        let mut rec = vec![0u8; tx.record_len(3)];
        tx.seal(&mut rec, APPLICATION_DATA, 3, |p| p.copy_from_slice(b"abc"))
            .unwrap();
        let (_, range) = rx.open(&mut rec).unwrap();
        assert_eq!(&rec[range], b"abc");
    }

    #[test]
    fn records_back_to_back_open_into_their_plaintext_back_to_back() {
        for version in [Version::Tls12, Version::Tls13] {
            for which in 0..3 {
                let (mut tx, mut rx) = (key(version, which, 0), key(version, which, 0));
                let data = pattern_bytes(5000);
                let mut wire = Vec::new();
                for piece in data.chunks(1700) {
                    let at = wire.len();
                    wire.resize(at + tx.record_len(piece.len()), 0);
                    tx.seal(&mut wire[at..], APPLICATION_DATA, piece.len(), |p| {
                        p.copy_from_slice(piece)
                    })
                    .unwrap();
                }
                let (mut at, mut out) = (0, 0);
                while at < wire.len() {
                    let len =
                        HEADER + usize::from(u16::from_be_bytes([wire[at + 3], wire[at + 4]]));
                    let (ty, n) = rx.open_to(&mut wire, at, len, out).unwrap();
                    assert_eq!(ty, APPLICATION_DATA);
                    at += len;
                    out += n;
                }
                assert!(wire[..out] == data[..], "{version:?} {which}");
            }
        }
    }

    fn pattern_bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn a_tampered_or_replayed_record_is_refused() {
        for version in [Version::Tls12, Version::Tls13] {
            let (mut tx, mut rx) = (key(version, 0, 0), key(version, 0, 0));
            let mut rec = vec![0u8; tx.record_len(100)];
            tx.seal(&mut rec, APPLICATION_DATA, 100, |p| p.fill(1))
                .unwrap();
            let mut bad = rec.clone();
            bad[HEADER + 20] ^= 1;
            rx.open(&mut bad).unwrap_err();
            // Out of sequence: the receiver's count moved on.
            let mut rx = key(version, 0, 1);
            rx.open(&mut rec.clone()).unwrap_err();
        }
    }
}
