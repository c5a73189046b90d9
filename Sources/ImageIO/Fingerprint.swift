import CFingerprint

/// A fast 128-bit fingerprint of a chunk, for comparing what the card returns with what was
/// written when the source cannot simply be read again (a compressed stream).
///
/// Why not SHA-256 here: the value is computed by us from the stream and compared by us with
/// the read-back, so nobody can choose data to collide with it; what it must catch is a card
/// that returns other bytes (flipped bits, lost writes, a fake-capacity card that wraps to an
/// earlier offset, sectors in another order). A vector hash (CFingerprint: eight lanes of
/// 32×32→64-bit products, scrambled every 1 KiB) does that with a miss probability of about
/// 2⁻⁶⁴ per damaged chunk, at memory speed (with AVX2 35 GB/s from cache, 12 GB/s from
/// memory on this project's VM; 15 GB/s without), where SHA-256 runs at
/// ~1.3 GB/s and, computed twice (stream and read-back), took a whole core on a 2-core
/// station. SHA-256 stays where the expected value comes from outside: the bmap's checksums.
struct Fingerprint: Equatable, Sendable {
    let high: UInt64
    let low: UInt64

    init(_ bytes: UnsafeRawBufferPointer) {
        var fingerprinter = Fingerprinter()
        fingerprinter.update(bytes)
        self = fingerprinter.value
    }

    init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }
}

/// A fingerprint computed over bytes that arrive in pieces; `copy` also moves them, in the
/// same pass through memory (the decompressor's output on its way into a chunk).
struct Fingerprinter {
    private var state = provision_fingerprint_state()

    init() { provision_fingerprint_init(&state) }

    mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress else { return }
        provision_fingerprint_update(&state, base, bytes.count)
    }

    /// Copies `source` to `destination` (at least as large) and adds the bytes.
    mutating func copy(_ source: UnsafeRawBufferPointer, to destination: UnsafeMutableRawPointer) {
        guard let base = source.baseAddress else { return }
        provision_fingerprint_copy_update(&state, destination, base, source.count)
    }

    var value: Fingerprint {
        var state = self.state
        var high: UInt64 = 0
        var low: UInt64 = 0
        provision_fingerprint_final(&state, &high, &low)
        return Fingerprint(high: high, low: low)
    }
}
