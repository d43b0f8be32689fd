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

use ring::aead;
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
        if rec.len() < HEADER {
            return Err(invalid("TLS: truncated record"));
        }
        let outer = rec[0];
        let body_len = rec.len() - HEADER;
        let prefix = self.prefix();
        if body_len < prefix + self.suffix() {
            return Err(invalid("TLS: record too short to be sealed"));
        }
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&rec[..HEADER]);
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
                    nonce[4..].copy_from_slice(&rec[HEADER..HEADER + prefix]);
                }
                aad_buf = self.tls12_aad(outer, plain_len);
                &aad_buf
            }
        };
        let start = HEADER + prefix;
        let opened = self
            .key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                &mut rec[start..],
            )
            .map_err(|_| invalid("TLS: a record failed to authenticate (bad_record_mac)"))?
            .len();
        self.seq += 1;
        match self.version {
            Version::Tls12 => Ok((outer, start..start + opened)),
            Version::Tls13 => {
                // The content type is the last non-zero byte (zeros are padding).
                let inner = &rec[start..start + opened];
                let Some(at) = inner.iter().rposition(|&b| b != 0) else {
                    return Err(invalid("TLS: record without a content type"));
                };
                Ok((inner[at], start..start + at))
            }
        }
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
