#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ImageIO

/// Checks that a card stores what it claims before the first byte of the image (issue 16),
/// the way f3probe does: unique tagged blocks written with O_DIRECT at spread offsets over
/// the whole claimed capacity, read back, and every block must come back as itself.
///
/// Where the blocks go, and why there:
/// - offset 0 and every power of two up to the claimed size: a counterfeit controller
///   ignores the high address bits, so a card that stores 2^m bytes puts offset 2^m onto
///   offset 0 (and 2^m + 2^k onto 2^k). The blocks are written from the highest offset
///   down, so the lower block of an aliasing pair is written last and survives: the
///   higher one reads back the lower one's tag, which says where it landed, and the real
///   size is the distance between the two.
/// - the last block: a card that drops writes past its real size (or returns zeros
///   there) fails it whatever that size is.
/// - an even grid of `gridPositions` blocks: a real size that is no power of two is
///   bracketed within 1/gridPositions of the claimed size, then narrowed to 1 MiB by
///   bisection with single blocks.
///
/// What the blocks overwrite is read first and written back afterwards on every ending
/// (the image overwrites what lies inside it anyway, but a refused card must stay as it
/// was). Reads and writes go through the target's descriptor (O_DIRECT for a block
/// device), and the blocks are flushed with fdatasync before they are read back, so
/// neither the page cache nor the card's own write cache can answer for the flash.
public enum CapacityProbe {
    public struct Result: Sendable, Equatable {
        public let claimedBytes: UInt64
        /// Nil when every block came back as itself; otherwise the estimate of what the card
        /// really stores (to 1 MiB for a card that drops, exact for one that wraps).
        public let realBytes: UInt64?
        public let blocks: Int
        public let seconds: Double
        public var isCounterfeit: Bool { realBytes != nil }

        public init(claimedBytes: UInt64, realBytes: UInt64?, blocks: Int, seconds: Double) {
            self.claimedBytes = claimedBytes
            self.realBytes = realBytes
            self.blocks = blocks
            self.seconds = seconds
        }

        /// "card claims 64.0 GB but stores about 8.0 GB: refused as counterfeit"
        public var refusal: String? {
            realBytes.map { "card claims \(Self.gigabytes(claimedBytes)) but stores about \(Self.gigabytes($0)): refused as counterfeit" }
        }

        /// Decimal gigabytes, as card packaging counts them; megabytes below 1 GB.
        static func gigabytes(_ bytes: UInt64) -> String {
            let value = Double(bytes)
            if value >= 1e9 { return String(format: "%.1f GB", value / 1e9) }
            return String(format: "%.1f MB", value / 1e6)
        }
    }

    public struct Failure: Error, Sendable, CustomStringConvertible {
        public let description: String
    }

    /// Blocks of the even grid.
    static let gridPositions = 64
    /// The estimate of a dropping card's real size is narrowed to this.
    static let precision: UInt64 = 1 << 20

    /// The offsets probed on a card of `size` bytes with blocks of `block` bytes, highest
    /// first (the order they are written in).
    public static func positions(size: UInt64, block: Int) -> [UInt64] {
        let b = UInt64(block)
        let last = (size / b - 1) * b
        var set: Set<UInt64> = [0, last]
        var p = b
        while p <= last {
            set.insert(p)
            p <<= 1
        }
        let step = size / UInt64(gridPositions)
        for i in 1..<UInt64(gridPositions) { set.insert(min(last, i * step / b * b)) }
        return set.sorted(by: >)
    }

    /// Probes the card behind `target` (a block device, open O_DIRECT). Throws only when the
    /// card cannot be read or written at all; a lying card is a result, not an error.
    public static func run(_ target: WriteTarget) throws(Failure) -> Result {
        let started = ContinuousClock.now
        let block = target.alignment
        guard let size = target.size, size >= UInt64(2 * block) else {
            throw Failure(description: "capacity probe: \(target.path) reports no size, or less than two \(block)-byte blocks")
        }
        let nonce = UInt64.random(in: 1...UInt64.max)
        var session = Session(fd: target.fd, path: target.path, block: block, nonce: nonce)
        defer { session.restore() }

        let positions = positions(size: size, block: block)
        for p in positions { try session.save(p) }
        for p in positions { try session.writeTag(p) }
        try session.flush()
        var lowestBad: UInt64?
        var wrapSize: UInt64?
        for p in positions.reversed() {
            switch try session.readTag(p) {
            case .itself: continue
            case .other(let q) where q < p:
                wrapSize = min(wrapSize ?? .max, p - q)
                lowestBad = min(lowestBad ?? .max, p)
            case .other, .foreign:
                lowestBad = min(lowestBad ?? .max, p)
            }
        }
        guard let lowestBad else {
            return Result(claimedBytes: size, realBytes: nil, blocks: positions.count, seconds: seconds(since: started))
        }
        if let wrapSize, wrapSize <= lowestBad {
            return Result(claimedBytes: size, realBytes: wrapSize, blocks: positions.count, seconds: seconds(since: started))
        }
        // Dropped (or garbled) past some size: between the highest good block below the
        // lowest bad one and that bad one, one block at a time.
        var good = positions.filter { $0 < lowestBad }.max() ?? 0
        var bad = lowestBad
        var extra = 0
        while bad - good > precision {
            let mid = (good + (bad - good) / 2) / UInt64(block) * UInt64(block)
            guard mid > good else { break }
            try session.save(mid)
            try session.writeTag(mid)
            try session.flush()
            extra += 1
            if case .itself = try session.readTag(mid) { good = mid } else { bad = mid }
        }
        return Result(claimedBytes: size, realBytes: bad, blocks: positions.count + extra, seconds: seconds(since: started))
    }

    private static func seconds(since start: ContinuousClock.Instant) -> Double {
        let d = ContinuousClock.now - start
        return Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    enum Readback { case itself, other(UInt64), foreign }

    /// The probe's blocks and what they replaced. A class-free value owned by `run`.
    struct Session {
        let fd: Int32
        let path: String
        let block: Int
        let nonce: UInt64
        let buffer: AlignedBuffer
        /// Offset → the bytes it held before the probe, in the order saved.
        var saved: [(UInt64, [UInt8])] = []
        var savedOffsets: Set<UInt64> = []

        init(fd: Int32, path: String, block: Int, nonce: UInt64) {
            self.fd = fd
            self.path = path
            self.block = block
            self.nonce = nonce
            buffer = AlignedBuffer(capacity: block, alignment: block)
        }

        mutating func save(_ offset: UInt64) throws(Failure) {
            guard !savedOffsets.contains(offset) else { return }
            try read(offset)
            saved.append((offset, Array(UnsafeRawBufferPointer(start: buffer.bytes, count: block))))
            savedOffsets.insert(offset)
        }

        /// Writes back every saved block. Everything was saved before the first probe write,
        /// so on a card that wraps two offsets sharing one place were saved with the same
        /// bytes and either write restores it. Best effort: it runs on every ending.
        mutating func restore() {
            for (offset, bytes) in saved.reversed() {
                bytes.withUnsafeBytes { buffer.bytes.copyMemory(from: $0.baseAddress!, byteCount: block) }
                _ = pwrite(fd, buffer.bytes, block, off_t(offset))
            }
            if !saved.isEmpty { fdatasync(fd) }
            saved.removeAll()
            savedOffsets.removeAll()
        }

        /// The block for `offset`: a header (magic, nonce, offset) and a pattern derived
        /// from both, so that neither zeros, stale data, nor another block passes as it.
        func fill(_ offset: UInt64, into p: UnsafeMutableRawPointer) {
            let words = p.bindMemory(to: UInt64.self, capacity: block / 8)
            words[0] = CapacityProbe.magic
            words[1] = nonce
            words[2] = offset
            var x = nonce ^ (offset &* 0x9E37_79B9_7F4A_7C15) | 1
            for i in 3..<(block / 8) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17
                words[i] = x
            }
        }

        mutating func writeTag(_ offset: UInt64) throws(Failure) {
            fill(offset, into: buffer.bytes)
            let n = pwrite(fd, buffer.bytes, block, off_t(offset))
            guard n == block else {
                throw Failure(description: "capacity probe: cannot write \(path) at byte \(offset): \(n < 0 ? String(cString: strerror(errno)) : "short write")")
            }
        }

        func flush() throws(Failure) {
            guard fdatasync(fd) == 0 else {
                throw Failure(description: "capacity probe: cannot flush \(path): \(String(cString: strerror(errno)))")
            }
        }

        func read(_ offset: UInt64) throws(Failure) {
            let n = pread(fd, buffer.bytes, block, off_t(offset))
            guard n == block else {
                throw Failure(description: "capacity probe: cannot read \(path) at byte \(offset): \(n < 0 ? String(cString: strerror(errno)) : "short read")")
            }
        }

        func readTag(_ offset: UInt64) throws(Failure) -> Readback {
            try read(offset)
            let expected = AlignedBuffer(capacity: block, alignment: block)
            fill(offset, into: expected.bytes)
            if memcmp(expected.bytes, buffer.bytes, block) == 0 { return .itself }
            let words = buffer.bytes.bindMemory(to: UInt64.self, capacity: 3)
            guard words[0] == CapacityProbe.magic, words[1] == nonce else { return .foreign }
            // Another block of this probe, whole: the card put it here.
            fill(words[2], into: expected.bytes)
            return memcmp(expected.bytes, buffer.bytes, block) == 0 ? .other(words[2]) : .foreign
        }
    }

    /// "PROVPRB1" little-endian.
    static let magic: UInt64 = 0x3142_5250_5652_4F50
}
