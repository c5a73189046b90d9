#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ImageIO
import ProvisionCShims

/// Checks that a card stores what it claims before the first byte of the image (issue 16),
/// the way f3probe does: unique tagged blocks written with O_DIRECT at spread offsets over
/// the whole claimed capacity, read back, and every block must come back as itself.
///
/// Where the blocks go, and why there:
/// - offset 0 and every power of two up to the claimed size: a counterfeit controller
///   usually ignores the high address bits, so a card that stores 2^m bytes puts offset
///   2^m onto offset 0. Of two blocks that land on one place, the one written last
///   survives, and the other reads back its tag, which says where it landed.
/// - a wrap at any other size R (a card whose controller counts modulo its real size, or
///   the FUSE fake card in the tests) lands offset p on p mod R, which only shows if a
///   block of the probe is there. Every block of the first `window` bytes is probed, in
///   runs of 1 MiB (cheap: sequential), and "wrap catchers" `window` apart run down from
///   the end over the upper half of the card: for any R some multiple kR falls between two
///   of them, so the one above it lands inside the window. The window is written first and
///   read back last, so a catcher that landed there shows in the window's read-back and
///   needs no read of its own. (A baby-step giant-step cover: a 4 MiB window and 256
///   catchers on a 2 GiB card, instead of writing the whole card as f3write does; the
///   window's size balances its bytes against the catchers' random writes, each worth
///   some 8 KiB of sequential transfer (measured on the throttled loop card of
///   benchmarks/probe.sh: 2 and 8 MiB windows cost more).) Any collision gives a multiple of R;
///   dividing it down while the card still aliases there gives R exactly.
/// - the last block: a card that drops writes past its real size (or returns zeros
///   there) fails it whatever that size is.
/// - an even grid of `gridPositions` blocks: a dropping card's real size is bracketed
///   within 1/gridPositions of the claimed size, then narrowed to 1 MiB by bisection with
///   single blocks (16, not more: each grid block costs every card four small I/Os, each
///   halving of the bracket only a refused card one flush and three).
///
/// What the blocks overwrite is read first and written back on every ending — except, on
/// a card that passed, what the image is about to overwrite (`overwritten`: the whole
/// image, or a bmap's mapped ranges): not writing it twice keeps the probe's cost on a slow
/// card low. A refused
/// card gets everything back. Reads and writes go through the target's descriptor
/// (O_DIRECT for a block device), and the blocks are flushed with fdatasync before they are
/// read back, so neither the page cache nor the card's own write cache can answer for the
/// flash.
///
/// The window goes in runs of 1 MiB, one after another; the single blocks are saved, written,
/// read back and restored all in flight at once (Linux AIO, `provision_transfer_places`): the
/// card's queue stays full while the probe's thread waits for a CPU (32 cards probe together
/// on a station with two), and a USB reader is not idle between commands. Their order does
/// not matter: the window is written (and done) before any of them, so a block landing in it
/// always shows there, and of two blocks that collide either may survive — `judge` takes the
/// pair alike, and any collision gives a multiple of the real size, which is divided down.
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
    static let gridPositions = 16
    /// The estimate of a dropping card's real size is narrowed to this.
    static let precision: UInt64 = 1 << 20
    /// The first window is read, written and read back in runs of this many bytes.
    static let runBytes = 1 << 20

    /// What the probe covers on a card of `size` bytes with blocks of `block` bytes.
    public struct Layout: Sendable, Equatable {
        /// Every block below this is probed (one sequential run).
        public let window: UInt64
        /// Single blocks above the window, highest first (the order they are written in).
        public let singles: [UInt64]
        /// Those of `singles` that only catch wraps: not read back (the window shows them).
        public let catchers: Set<UInt64>
    }

    /// The first window: the power of two at or above √(size/2 · 8 KiB), at least 1 MiB:
    /// `window` × (number of catchers) covers half the card, and the window's bytes cost
    /// about what the catchers' random I/O does.
    static func window(size: UInt64, block: Int) -> UInt64 {
        let ideal = (Double(size / 2) * 8192).squareRoot()
        var w: UInt64 = 1 << 20
        while Double(w) < ideal { w <<= 1 }
        return min(w, size / UInt64(block) * UInt64(block))
    }

    /// The single blocks probed on a card of `size` bytes (above the first window), highest
    /// first. `positions(size:block:)` adds the window's blocks.
    public static func layout(size: UInt64, block: Int) -> Layout {
        let b = UInt64(block)
        let last = (size / b - 1) * b
        let window = window(size: size, block: block)
        var set: Set<UInt64> = [last]
        var p = window
        while p <= last {
            set.insert(p)
            p <<= 1
        }
        let step = size / UInt64(gridPositions)
        for i in 1..<UInt64(gridPositions) { set.insert(min(last, i * step / b * b)) }
        let readBack = set
        // Wrap catchers: from the last block down, `window` apart, until half the card
        // (and the window itself) is covered.
        // The blocks cover (lowest − window, last]; a wrap at R below that has a multiple
        // inside it as soon as it is at least as wide as its lower end.
        var catcher = last
        while catcher >= window {
            set.insert(catcher)
            if catcher - window <= last / 2 { break }
            catcher -= window
        }
        return Layout(window: window, singles: set.filter { $0 >= window }.sorted(by: >), catchers: set.subtracting(readBack))
    }

    /// Every offset probed on a card of `size` bytes, highest first.
    public static func positions(size: UInt64, block: Int) -> [UInt64] {
        let l = layout(size: size, block: block)
        let windowBlocks = stride(from: l.window - UInt64(block), through: 0, by: -block).map { $0 }
        return l.singles + windowBlocks
    }

    /// Probes the card behind `target` (a block device, open O_DIRECT). Throws only when the
    /// card cannot be read or written at all; a lying card is a result, not an error.
    /// `overwritten`: byte ranges the image writes next, which a passed card need not get
    /// back (empty: everything is restored).
    ///
    /// Memory (issue 18: 32 cards probe at once): with a `budget`, the probe's one I/O buffer
    /// is the station's, taken like a write's; with a `stashDirectory`, what it overwrote is
    /// kept in an unlinked file there (the page cache, not the daemon's memory: a 64 GB card's
    /// window is 16 MiB) and read back for the restore. Without them (`provision write`),
    /// both live in memory. The window's first `pipedRuns` runs are kept in pipes instead
    /// (`Stash`: no copy of them at all), where the card's descriptor is O_DIRECT.
    /// `leftover`: on a passed card, takes what the probe left in `overwritten` (its blocks,
    /// and what those places held), for the caller to put back if the image's first byte is
    /// never written. Without it those places are left as the probe wrote them.
    public static func run(_ target: WriteTarget, overwritten: [Range<UInt64>] = [], budget: BufferBudget? = nil,
                           stashDirectory: String? = nil, cancellation: CancellationFlag? = nil,
                           leftover: Leftover? = nil, pipedRuns: Int = CapacityProbe.pipedRuns) throws(Failure) -> Result {
        let started = ContinuousClock.now
        let block = target.alignment
        guard let size = target.size, size >= UInt64(2 * block) else {
            throw Failure(description: "capacity probe: \(target.path) reports no size, or less than two \(block)-byte blocks")
        }
        let nonce = UInt64.random(in: 1...UInt64.max)
        let capacity = max(CapacityProbe.runBytes, block)
        let pool = budget.map { BufferPool(budget: $0, maximum: 1, bufferSize: capacity, alignment: block, cancellation: cancellation) }
        defer { pool?.close() }
        let buffer: AlignedBuffer
        if let pool {
            guard let taken = pool.acquire() else { throw Failure(description: "capacity probe: cancelled before \(target.path) was touched") }
            buffer = taken
        } else {
            buffer = AlignedBuffer(capacity: capacity, alignment: block)
        }
        defer { pool?.release(buffer) }
        guard buffer.capacity >= capacity else {
            throw Failure(description: "capacity probe: the buffer budget (\(budget?.limit ?? 0) bytes) is smaller than one probe run of \(capacity) bytes")
        }
        var session = Session(fd: target.fd, path: target.path, block: block, nonce: nonce, buffer: buffer,
                              stash: Stash(directory: stashDirectory, pipedRuns: target.direct ? pipedRuns : 0))
        let found: (realBytes: UInt64?, blocks: Int)
        do throws(Failure) { found = try examine(&session, size: size, block: block) } catch {
            session.restore(skipping: [])
            throw error
        }
        // The restore is part of the probe's cost: timed with it.
        session.restore(skipping: found.realBytes == nil ? overwritten : [], handingTo: leftover)
        return Result(claimedBytes: size, realBytes: found.realBytes, blocks: found.blocks, seconds: seconds(since: started))
    }

    /// Writes, reads back and judges the blocks; what the card really stores (nil: all it
    /// claims) and how many blocks that took. Everything it overwrites is saved in `session`.
    private static func examine(_ session: inout Session, size: UInt64, block: Int) throws(Failure) -> (realBytes: UInt64?, blocks: Int) {
        let layout = layout(size: size, block: block)
        let b = UInt64(block)
        // Saved first, all of it, before any probe write: two offsets that share one place on
        // a wrapping card are then saved with the same (original) bytes.
        // The window in runs of `runBytes` (its last run may be shorter).
        let runs = stride(from: UInt64(0), to: layout.window, by: runBytes).map { ($0, Int(min(UInt64(runBytes), layout.window - $0))) }
        for (run, bytes) in runs { try session.save(run, bytes: bytes, inPipe: true) }
        try session.saveBlocks(layout.singles)
        // The window first; then the single blocks, all at once: a block landing in the window
        // overwrites it there, and of two single blocks that collide the one written last
        // survives (either: the other reads back its tag, and `judge` takes the pair alike).
        for (run, bytes) in runs { try session.writeTags(run, bytes: bytes) }
        try session.writeBlockTags(layout.singles)
        try session.flush()

        var lowestBad: UInt64?
        var collision: UInt64?
        func judge(_ p: UInt64, _ found: Readback) {
            switch found {
            case .itself: return
            case .other(let q):
                // Both offsets land on one place: the real size divides their distance, and
                // the higher of the two is the one the card does not store.
                let distance = p > q ? p - q : q - p
                collision = min(collision ?? .max, distance)
                lowestBad = min(lowestBad ?? .max, max(p, q))
            case .foreign:
                lowestBad = min(lowestBad ?? .max, p)
            }
        }
        for (run, bytes) in runs {
            for (i, found) in try session.readTags(run, bytes: bytes).enumerated() { judge(run + UInt64(i) * b, found) }
        }
        let readBack = layout.singles.reversed().filter { !layout.catchers.contains($0) }
        for (p, found) in zip(readBack, try session.readBlockTags(readBack)) { judge(p, found) }
        var blocks = Int(layout.window / b) + layout.singles.count

        guard let lowestBad else {
            return (nil, blocks)
        }
        if var multiple = collision {
            // `multiple` is a multiple of the real size R: divide it by each of its prime
            // factors for as long as that offset still lands on offset 0. It ends at R
            // exactly: were it kR with k > 1, a prime of k would still divide it down.
            var rest = multiple / b
            var primes: [UInt64] = []
            var f: UInt64 = 2
            while f * f <= rest {
                if rest % f == 0 {
                    primes.append(f)
                    while rest % f == 0 { rest /= f }
                }
                f += 1
            }
            if rest > 1 { primes.append(rest) }
            for p in primes {
                while (multiple / b) % p == 0, try session.aliasesZero(multiple / p) {
                    multiple /= p
                    blocks += 2
                }
            }
            if multiple <= lowestBad {
                return (multiple, blocks)
            }
        }
        // Dropped (or garbled) past some size: between the highest good block below the
        // lowest bad one and that bad one, one block at a time.
        // (Only blocks that were read back count as good: a catcher was not.)
        var good = positions(size: size, block: block).filter { $0 < lowestBad && !layout.catchers.contains($0) }.max() ?? 0
        var bad = lowestBad
        while bad - good > precision {
            let mid = (good + (bad - good) / 2) / b * b
            guard mid > good else { break }
            try session.save(mid, bytes: block)
            try session.writeTags(mid, bytes: block)
            try session.flush()
            blocks += 1
            if case .itself = try session.readTags(mid, bytes: block)[0] { good = mid } else { bad = mid }
        }
        return (bad, blocks)
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
        /// One run of the first window, or one block.
        let buffer: AlignedBuffer
        /// The bytes each saved run held before the probe, in the order saved.
        var stash: Stash
        var savedBlocks: Set<UInt64> = []

        /// The words after each block's header.
        let pattern: TagPattern

        init(fd: Int32, path: String, block: Int, nonce: UInt64, buffer: AlignedBuffer, stash: Stash) {
            self.fd = fd
            self.path = path
            self.block = block
            self.nonce = nonce
            pattern = TagPattern(nonce: nonce, block: block)
            self.buffer = buffer
            self.stash = stash
        }

        /// Keeps what `bytes` bytes at `offset` hold, unless already kept: `inPipe`, in a pipe
        /// of their own if the stash may take one more.
        mutating func save(_ offset: UInt64, bytes: Int, inPipe: Bool = false) throws(Failure) {
            guard !savedBlocks.contains(offset) else { return }
            if !(inPipe && stash.capture(from: fd, offset: offset, count: bytes)) {
                try read(offset, bytes: bytes)
                try stash.keep(UnsafeRawBufferPointer(start: buffer.bytes, count: bytes), from: offset)
            }
            for i in 0..<(bytes / block) { savedBlocks.insert(offset + UInt64(i * block)) }
        }

        /// `offsets` in groups of as many single blocks as `buffer` holds.
        private func groups(_ offsets: [UInt64]) -> [ArraySlice<UInt64>] {
            let size = buffer.capacity / block
            return stride(from: 0, to: offsets.count, by: size).map { offsets[$0..<min($0 + size, offsets.count)] }
        }

        /// Keeps what the single blocks at `offsets` hold (those not kept yet): read all at
        /// once, as many as `buffer` holds at a time, and kept in one piece each time.
        mutating func saveBlocks(_ offsets: [UInt64]) throws(Failure) {
            for group in groups(offsets.filter { savedBlocks.insert($0).inserted }) {
                try transfer(group, writing: false)
                try stash.keep(UnsafeRawBufferPointer(start: buffer.bytes, count: group.count * block), runs: group.map { ($0, block) })
            }
        }

        /// Writes the tagged single blocks at `offsets`, all at once (in no particular order).
        func writeBlockTags(_ offsets: [UInt64]) throws(Failure) {
            for group in groups(offsets) {
                for (i, p) in group.enumerated() { fill(p, into: buffer.bytes + i * block) }
                try transfer(group, writing: true)
            }
        }

        /// What the single blocks at `offsets` hold now, read all at once.
        func readBlockTags(_ offsets: [UInt64]) throws(Failure) -> [Readback] {
            var found: [Readback] = []
            for group in groups(offsets) {
                try transfer(group, writing: false)
                found += group.enumerated().map { i, p in judge(p, buffer.bytes + i * block) }
            }
            return found
        }

        /// One block at each of `offsets`, to or from `buffer`'s blocks in order, all in flight
        /// together: the card's queue stays full while this thread waits for a CPU (32 cards
        /// probe at once on a station), and a USB reader is not idle between commands.
        private func transfer(_ offsets: ArraySlice<UInt64>, writing: Bool) throws(Failure) {
            let places = Array(offsets)
            let lengths = [UInt32](repeating: UInt32(block), count: places.count)
            var failed: Int32 = 0
            guard provision_transfer_places(fd, writing ? 1 : 0, places, lengths, Int32(places.count), buffer.bytes,
                                            CapacityProbe.queueDepth, &failed, nil) == 0 else {
                let why = String(cString: strerror(errno))
                throw Failure(description: "capacity probe: cannot \(writing ? "write" : "read") \(path) at byte \(places[Int(failed)]): \(why)")
            }
        }

        /// Writes back every saved run but those inside one of `skipped`. Everything
        /// was saved before the first probe write, so on a card that wraps two offsets sharing
        /// one place were saved with the same bytes and either write restores it. Best
        /// effort: it runs on every ending.
        /// The skipped runs go to `leftover` when there is one (else they are dropped).
        mutating func restore(skipping skipped: [Range<UInt64>], handingTo leftover: Leftover? = nil) {
            var restored: [Int] = [], kept: [Int] = []
            for run in stash.runs.indices {
                let (offset, count) = (stash.runs[run].offset, stash.runs[run].count)
                let skip = skipped.contains(where: { $0.lowerBound <= offset && offset + UInt64(count) <= $0.upperBound })
                if skip { kept.append(run) } else { restored.append(run) }
            }
            stash.writeBack(restored, to: fd, through: buffer.bytes, capacity: buffer.capacity)
            if let leftover, !kept.isEmpty {
                leftover.take(stash, runs: kept, block: block)
                stash = Stash(directory: nil)
            } else {
                stash.removeAll()
            }
            savedBlocks.removeAll()
        }

        /// The block for `offset`: a header (magic, nonce, offset) and the probe's pattern
        /// keyed by the offset, so that neither zeros, stale data, nor another block passes as
        /// it (see `TagPattern`).
        func fill(_ offset: UInt64, into p: UnsafeMutableRawPointer) {
            pattern.fill(offset, into: p)
            let words = p.bindMemory(to: UInt64.self, capacity: 3)
            words[0] = CapacityProbe.magic
            words[1] = nonce
            words[2] = offset
        }

        /// Whether `found` is the block `fill(offset)` makes.
        func matches(_ offset: UInt64, _ found: UnsafeRawPointer) -> Bool {
            found.load(as: UInt64.self) == CapacityProbe.magic && found.load(fromByteOffset: 8, as: UInt64.self) == nonce
                && found.load(fromByteOffset: 16, as: UInt64.self) == offset && pattern.matches(offset, found)
        }

        /// Writes the tagged blocks of `bytes` bytes from `offset`, in one write.
        func writeTags(_ offset: UInt64, bytes: Int) throws(Failure) {
            for i in 0..<(bytes / block) { fill(offset + UInt64(i * block), into: buffer.bytes + i * block) }
            let n = pwrite(fd, buffer.bytes, bytes, off_t(offset))
            guard n == bytes else {
                throw Failure(description: "capacity probe: cannot write \(path) at byte \(offset): \(n < 0 ? String(cString: strerror(errno)) : "short write")")
            }
        }

        func flush() throws(Failure) {
            guard fdatasync(fd) == 0 else {
                throw Failure(description: "capacity probe: cannot flush \(path): \(String(cString: strerror(errno)))")
            }
        }

        func read(_ offset: UInt64, bytes: Int) throws(Failure) {
            let n = pread(fd, buffer.bytes, bytes, off_t(offset))
            guard n == bytes else {
                throw Failure(description: "capacity probe: cannot read \(path) at byte \(offset): \(n < 0 ? String(cString: strerror(errno)) : "short read")")
            }
        }

        /// What each block of `bytes` bytes from `offset` holds now.
        func readTags(_ offset: UInt64, bytes: Int) throws(Failure) -> [Readback] {
            try read(offset, bytes: bytes)
            return (0..<(bytes / block)).map { i in judge(offset + UInt64(i * block), buffer.bytes + i * block) }
        }

        private func judge(_ offset: UInt64, _ found: UnsafeMutableRawPointer) -> Readback {
            if matches(offset, found) { return .itself }
            let words = found.bindMemory(to: UInt64.self, capacity: 3)
            guard words[0] == CapacityProbe.magic, words[1] == nonce else { return .foreign }
            // Another block of this probe, whole: the card put it here.
            let other = words[2]
            return matches(other, found) ? .other(other) : .foreign
        }

        /// Whether `offset` lands on offset 0: its block is written, then block 0's, and
        /// `offset` then reads back as block 0.
        mutating func aliasesZero(_ offset: UInt64) throws(Failure) -> Bool {
            try save(offset, bytes: block)
            try writeTags(offset, bytes: block)
            try writeTags(0, bytes: block)
            try flush()
            if case .other(0) = try readTags(offset, bytes: block)[0] { return true }
            return false
        }
    }

    /// A tag block's words after its header: random words drawn once for the probe (from
    /// its nonce) and XORed with a key of the block's offset (a bijection of it, so two
    /// offsets never share a key). Every word of a block differs from the same word of any
    /// other block of the probe (a card that returns a sector of another block fails), from
    /// a block of an earlier probe (other random words) and, but for a 2⁻⁶⁴ chance per word,
    /// from zeros. Writing and checking a block is one XOR a word, at memory speed: a
    /// generator run for every block was a tenth of a card's CPU at 32 cards (issue 18).
    final class TagPattern: @unchecked Sendable {
        /// The block's words in groups of four; the first group's first three are the header's.
        private let words: UnsafeMutableBufferPointer<SIMD4<UInt64>>

        init(nonce: UInt64, block: Int) {
            precondition(block % 32 == 0, "a probe block is whole 32-byte groups")
            words = .allocate(capacity: block / 32)
            // Four xorshift generators side by side, seeded from the nonce.
            var x = SIMD4<UInt64>(nonce, nonce &+ 0x6A09_E667_F3BC_C909, nonce &+ 0xBB67_AE85_84CA_A73B, nonce &+ 0x3C6E_F372_FE94_F82B) | 1
            for i in words.indices {
                x ^= x &<< 13; x ^= x &>> 7; x ^= x &<< 17
                words[i] = x
            }
        }

        deinit { words.deallocate() }

        private static func key(_ offset: UInt64) -> SIMD4<UInt64> { SIMD4(repeating: offset &* 0x9E37_79B9_7F4A_7C15) }

        /// Writes the block's words for `offset` to `p` (its header's three words too: the
        /// caller writes the header over them).
        func fill(_ offset: UInt64, into p: UnsafeMutableRawPointer) {
            let key = Self.key(offset)
            let out = p.bindMemory(to: SIMD4<UInt64>.self, capacity: words.count)
            for i in words.indices { out[i] = words[i] ^ key }
        }

        /// Whether the words after the header of `found` are those of the block for `offset`
        /// (any alignment: all differences are gathered, then checked once).
        func matches(_ offset: UInt64, _ found: UnsafeRawPointer) -> Bool {
            let key = Self.key(offset)
            // The first group's header lanes are masked out.
            var differ = (found.loadUnaligned(as: SIMD4<UInt64>.self) ^ words[0] ^ key) & SIMD4(0, 0, 0, ~0)
            for i in 1..<words.count { differ |= found.loadUnaligned(fromByteOffset: i * 32, as: SIMD4<UInt64>.self) ^ words[i] ^ key }
            return differ == .zero
        }
    }

    /// What a passed probe left where the image writes next: its blocks are there instead of
    /// what the card held. The image overwrites them; a job that ends before the image's first
    /// byte (cancelled, the source unreadable, the card pulled) puts the card's bytes back, so
    /// that "nothing was written" holds. Used by one job's thread.
    public final class Leftover: @unchecked Sendable {
        private var stash: Stash?
        private var runs: [Int] = []
        private var block = 512

        public init() {}

        /// Whether there is anything to put back.
        public var isEmpty: Bool { runs.isEmpty }

        func take(_ stash: Stash, runs: [Int], block: Int) {
            self.stash = stash
            self.runs = runs
            self.block = block
        }

        /// Whether the image's first byte went to the card.
        public private(set) var imageBegan = false

        /// The image's first byte is going to the card: the probe's blocks no longer matter.
        public func imageBegins() {
            imageBegan = true
            discard()
        }

        private func discard() {
            stash = nil
            runs = []
        }

        /// Writes back what those places held (best effort, like the probe's own restore) and
        /// forgets it. The caller has checked that the card is still the one probed.
        public func restore(to target: WriteTarget) {
            defer { discard() }
            guard let stash, !runs.isEmpty else { return }
            let largest = runs.map { stash.runs[$0].count }.max() ?? 0
            // A few runs of 1 MiB at most, on a failure path: plain memory, not the budget's
            // (a cancelled job could not take from it).
            let buffer = AlignedBuffer(capacity: max(largest, block), alignment: max(block, 4096))
            stash.writeBack(runs, to: target.fd, through: buffer.bytes, capacity: buffer.capacity)
        }
    }

    /// What the probe overwrote, kept until the restore: the first runs of the window in pipes
    /// (`pipedRuns` of them, read into the pipe with splice(2) from the card's O_DIRECT
    /// descriptor and written back the same way: the card's bytes are never copied, where a
    /// file costs a copy in and one out, and at 32 cards probing at once on two CPUs those
    /// copies were half the probes' CPU); the rest in an unlinked file of the given directory
    /// (`O_TMPFILE`: nothing is left behind on any ending, a crash included), or in memory
    /// where there is none or it cannot take a run (then that run stays in memory).
    final class Stash {
        enum Place {
            /// Bytes from here in the file.
            case file(Int)
            /// An index into `memory`.
            case memory(Int)
            /// An index into `pipes`: a pipe holding this run alone.
            case pipe(Int)
        }
        private(set) var runs: [(offset: UInt64, count: Int, place: Place)] = []
        private var memory: [[UInt8]] = []
        private let fd: Int32
        private var fileEnd = 0
        /// Nil once written back.
        private var pipes: [SplicePipe?] = []
        private let pipedRuns: Int

        init(directory: String?, pipedRuns: Int = 0) {
            fd = directory.map { provision_open_tmpfile($0) } ?? -1
            self.pipedRuns = pipedRuns
        }

        deinit { if fd >= 0 { close(fd) } }

        /// Whether runs go to the file (else all stay in memory), and the bytes kept in memory.
        var usesFile: Bool { fd >= 0 }
        var bytesInMemory: Int { memory.reduce(0) { $0 + $1.count } }
        /// Pipes holding a run now, and their read ends.
        var pipesHeld: Int { pipeDescriptors.count }
        var pipeDescriptors: [Int32] { pipes.compactMap { $0?.read } }

        /// Keeps the `count` bytes at `offset` of `card` (an O_DIRECT descriptor) in a pipe of
        /// their own, if this stash may take one more and the kernel gives one that holds
        /// them (`fs.pipe-max-size`, the user's pipe quota); false leaves nothing behind, and
        /// the caller keeps them another way.
        func capture(from card: Int32, offset: UInt64, count: Int) -> Bool {
            guard pipes.count < pipedRuns, let pipe = SplicePipe(sizes: [count], atLeast: count),
                  pipe.fill(from: card, at: offset, count: count) == count else { return false }
            pipes.append(pipe)
            runs.append((offset, count, .pipe(pipes.count - 1)))
            return true
        }

        func keep(_ bytes: UnsafeRawBufferPointer, from offset: UInt64) throws(Failure) {
            try keep(bytes, runs: [(offset, bytes.count)])
        }

        /// Keeps `bytes`, which are the `runs` back to back, in one write to the file.
        func keep(_ bytes: UnsafeRawBufferPointer, runs kept: [(offset: UInt64, count: Int)]) throws(Failure) {
            if fd >= 0, pwrite(fd, bytes.baseAddress!, bytes.count, off_t(fileEnd)) == bytes.count {
                for run in kept {
                    runs.append((run.offset, run.count, .file(fileEnd)))
                    fileEnd += run.count
                }
                return
            }
            var at = 0
            for run in kept {
                memory.append(Array(UnsafeRawBufferPointer(rebasing: bytes[at..<at + run.count])))
                runs.append((run.offset, run.count, .memory(memory.count - 1)))
                at += run.count
            }
        }

        /// Copies the bytes of `group` (runs back to back in the file, or one run in memory) to
        /// `destination`; false when the file cannot give them back (or the run is in a pipe:
        /// `writeBack` empties those onto the card).
        func load(_ group: [Int], into destination: UnsafeMutableRawPointer) -> Bool {
            switch runs[group[0]].place {
            case .memory(let i):
                memory[i].withUnsafeBytes { destination.copyMemory(from: $0.baseAddress!, byteCount: runs[group[0]].count) }
                return true
            case .file(let at):
                let bytes = group.reduce(0) { $0 + runs[$1].count }
                return pread(fd, destination, bytes, off_t(at)) == bytes
            case .pipe:
                return false
            }
        }

        /// The file's place of run `index`, if it is in the file.
        private func filePlace(_ index: Int) -> Int? {
            if case .file(let at) = runs[index].place { return at }
            return nil
        }

        /// Writes the runs `indices` back where they were read, through `buffer` (`capacity`
        /// bytes, at least the largest run), then syncs once. A run in a pipe goes from the
        /// pipe to the card (and the pipe is closed). Runs kept side by side in the file
        /// are read back in one piece, as many as `buffer` holds, and written all at once (in no
        /// particular order: every run was saved before the probe's first write, so two runs
        /// that share one place on a wrapping card hold the same bytes). Best effort: a run the
        /// file cannot give back, or the card does not take, is skipped; the others still go.
        func writeBack(_ indices: [Int], to fd: Int32, through buffer: UnsafeMutableRawPointer, capacity: Int) {
            var wrote = false
            var groups: [[Int]] = []
            var bytes = 0
            for index in indices.sorted(by: { (filePlace($0) ?? -1) < (filePlace($1) ?? -1) }) {
                if case .pipe(let p) = runs[index].place {
                    // Best effort, as below; the pipe goes either way.
                    wrote = true
                    _ = pipes[p]?.empty(onto: fd, at: runs[index].offset, count: runs[index].count)
                    pipes[p] = nil
                    continue
                }
                // Runs in the file, in its order; side by side ones in one group.
                if let at = filePlace(index), let last = groups.last?.last, let lastAt = filePlace(last),
                   at == lastAt + runs[last].count, bytes + runs[index].count <= capacity {
                    groups[groups.count - 1].append(index)
                    bytes += runs[index].count
                } else {
                    groups.append([index])
                    bytes = runs[index].count
                }
            }
            for group in groups where load(group, into: buffer) {
                var offsets = group.map { runs[$0].offset }
                var lengths = group.map { UInt32(runs[$0].count) }
                var at = buffer
                while !offsets.isEmpty {
                    var failed: Int32 = 0
                    guard provision_transfer_places(fd, 1, offsets, lengths, Int32(offsets.count), at, CapacityProbe.queueDepth, &failed, nil) != 0 else { break }
                    // Past the one the card refused.
                    let next = Int(failed) + 1
                    at += lengths[..<next].reduce(0) { $0 + Int($1) }
                    offsets.removeFirst(next)
                    lengths.removeFirst(next)
                }
                wrote = true
            }
            if wrote { fdatasync(fd) }
        }

        func removeAll() {
            runs = []
            memory = []
            pipes = []
            if fd >= 0 { _ = ftruncate(fd, 0) }
            fileEnd = 0
        }
    }

    /// The window's runs kept in pipes by default (`Stash`): the first 2 MiB, the whole
    /// window of a card up to 1 GiB; 2 pipes, 4 descriptors, a probe.
    public static let pipedRuns = 2

    /// How many of its window's runs each probe of a station with `slots` slots keeps in
    /// pipes. A pipe of 1 MiB counts 256 pages (of 4 KiB) against its user's pipe quota
    /// (`fs.pipe-user-pages-soft`, 16384 by default), which the packaged daemon, without
    /// CAP_SYS_RESOURCE or CAP_SYS_ADMIN, cannot pass; every slot's writer wants one such pipe
    /// (`ImageWriter`) and keeps it: the probes take only what those leave, and a probe that
    /// is refused one keeps that run in the file.
    public static func pipedRuns(slots: Int) -> Int {
        let capSysAdmin: Int32 = 21, capSysResource: Int32 = 24
        if provision_has_effective_capability(capSysAdmin) != 0 || provision_has_effective_capability(capSysResource) != 0 {
            return pipedRuns
        }
        guard let text = try? String(contentsOfFile: "/proc/sys/fs/pipe-user-pages-soft", encoding: .utf8),
              let soft = Int(text.trimmingCharacters(in: .whitespacesAndNewlines)) else { return 0 }
        if soft == 0 { return pipedRuns }
        // A pipe's slots are pages: 256 a MiB here, 64 with the 16 KiB pages of some ARM kernels.
        let pagesPerRun = max(1, runBytes / max(1, sysconf(Int32(_SC_PAGESIZE))))
        let spare = soft - max(slots, 1) * pagesPerRun
        return min(pipedRuns, max(0, spare / (max(slots, 1) * pagesPerRun)))
    }

    /// Single blocks in flight at once (Linux AIO; the most `provision_transfer_places` takes):
    /// enough to keep a card's queue full, and 32 probes together stay far below the system's
    /// aio-max-nr (65536 by default).
    static let queueDepth: Int32 = 64

    /// "PROVPRB1" little-endian.
    static let magic: UInt64 = 0x3142_5250_5652_4F50
}
