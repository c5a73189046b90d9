@testable import ImageIO
import CFingerprint
import Testing
import TestSupport

/// The read-back fingerprint of compressed sources must tell apart exactly what a bad card
/// returns: one flipped bit anywhere, a chunk from another offset, a short or longer read.
@Suite("chunk fingerprint")
struct FingerprintTests {
    func print(_ bytes: [UInt8]) -> Fingerprint { bytes.withUnsafeBytes { Fingerprint($0) } }

    @Test func sameBytesSameFingerprint() {
        let data = patternBytes(1 << 20 + 13)
        #expect(print(data) == print(data))
    }

    @Test("every single-bit flip changes it, in every lane and in the unaligned tail")
    func everyBitFlipIsSeen() {
        let data = patternBytes(4096 + 29)
        let reference = print(data)
        var seen = Set<[UInt64]>()
        for byte in stride(from: 0, to: data.count, by: 1) {
            for bit in [0, 3, 7] {
                var damaged = data
                damaged[byte] ^= UInt8(1 << bit)
                let f = print(damaged)
                #expect(f != reference, "flip of bit \(bit) at byte \(byte) not seen")
                seen.insert([f.high, f.low])
            }
        }
        // No two damaged versions collide either: the value spreads.
        #expect(seen.count == data.count * 3)
    }

    @Test("data from another offset (a fake-capacity card wrapping around) and zeros differ")
    func wrongDataDiffers() {
        let image = patternBytes(8 << 20)
        let chunk = Array(image[(4 << 20)..<(5 << 20)])
        let wrapped = Array(image[0..<(1 << 20)])
        #expect(print(chunk) != print(wrapped))
        #expect(print([UInt8](repeating: 0, count: 1 << 20)) != print([UInt8](repeating: 0, count: (1 << 20) - 8)))
        #expect(print([UInt8](repeating: 0, count: 1 << 20)) != print([UInt8](repeating: 0xFF, count: 1 << 20)))
    }

    @Test("swapped 8-byte words (lanes) are seen")
    func swappedWordsDiffer() {
        var data = patternBytes(64)
        let reference = print(data)
        for i in 0..<8 { data.swapAt(i, i + 8) }
        #expect(print(data) != reference)
        #expect(print([]) != print([0]))
    }

    @Test("sectors or 1 KiB blocks in another order are seen (the lanes add, so order must be keyed)")
    func reorderedSectorsDiffer() {
        let data = patternBytes(64 << 10)
        let reference = print(data)
        for size in [64, 512, 1024, 4096] {
            var swapped = data
            swapped.replaceSubrange(0..<size, with: data[size..<(2 * size)])
            swapped.replaceSubrange(size..<(2 * size), with: data[0..<size])
            #expect(print(swapped) != reference, "\(size)-byte pieces swapped, not seen")
        }
    }

    @Test("fed in pieces of any size, or copied on the way, it is the same value")
    func piecesAndCopyAgree() {
        let data = patternBytes(300_001)
        let whole = print(data)
        for piece in [1, 7, 63, 64, 65, 1000, 4096, 99_999] {
            var fed = Fingerprinter()
            var copied = Fingerprinter()
            var copy = [UInt8](repeating: 0, count: data.count)
            data.withUnsafeBytes { all in
                copy.withUnsafeMutableBytes { target in
                    var offset = 0
                    while offset < all.count {
                        let n = min(piece, all.count - offset)
                        let slice = UnsafeRawBufferPointer(rebasing: all[offset..<(offset + n)])
                        fed.update(slice)
                        copied.copy(slice, to: target.baseAddress! + offset)
                        offset += n
                    }
                }
            }
            #expect(fed.value == whole, "pieces of \(piece)")
            #expect(copied.value == whole, "copied in pieces of \(piece)")
            #expect(copy == data, "copy in pieces of \(piece)")
        }
    }

    #if arch(x86_64)
    @Test("the AVX2 loop and the portable one compute the same value")
    func vectorAndPortableAgree() throws {
        // Every x86-64 machine this runs on (this one, CI) has AVX2; without it the test fails
        // rather than compare the portable loop with itself.
        defer { _ = provision_fingerprint_use_avx2(1) }
        try #require(provision_fingerprint_use_avx2(1) == 1, "this CPU has no AVX2")
        for size in [0, 1, 63, 64, 1023, 1024, 1025, 4096 + 29, 1 << 20] {
            let data = patternBytes(size)
            _ = provision_fingerprint_use_avx2(1)
            let vector = print(data)
            try #require(provision_fingerprint_use_avx2(0) == 0, "the portable loop was not chosen")
            let portable = print(data)
            #expect(vector == portable, "\(size) bytes")
        }
    }
    #endif
}
