#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// How far a cache file has been filled: readers of a growing file wait on it.
///
/// One decompressor writes the image once into a (sparse) cache file; every card's writer
/// reads that file at its own speed, waiting here only when it has caught up with the
/// decompressor. That is what lets a batch decompress once without the slowest card holding
/// the others back (DESIGN.md §4, issue 7).
public final class CacheFill: @unchecked Sendable {
    private let condition = NSCondition()
    private var watermark: UInt64 = 0
    private var finished = false
    private var failure: ImageIOError?
    private var decoding = CacheFillReport(decoderThreads: 1)
    /// Where each reader now waiting wants the fill to reach, one entry per reader.
    private var waitingFor: [UInt64] = []
    /// Pacing (see `pace(lead:startLead:)`): nil while the fill runs as fast as it can.
    private var lead: UInt64?
    private var startLead: UInt64 = 0
    /// The furthest byte any reader has asked for, and whether any has asked yet.
    private var furthest: UInt64 = 0
    private var anyReader = false
    /// Fill threads now waiting for the readers, and how many times one had to.
    private var pacers = 0
    private var pauseCount = 0

    public init() {}

    /// How the image is being (or was) decoded.
    public var report: CacheFillReport { condition.withLock { decoding } }

    /// Every byte below this offset is in the file.
    public var filledUpTo: UInt64 { condition.withLock { watermark } }

    func record(_ report: CacheFillReport) {
        condition.withLock { decoding = report }
    }

    /// Blocks until every byte below `offset` is in the file (or the fill ended); says
    /// whether it had to wait.
    @discardableResult
    public func wait(upTo offset: UInt64) throws(ImageIOError) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        if !anyReader || offset > furthest {
            anyReader = true
            furthest = max(furthest, offset)
            if pacers > 0 { condition.broadcast() }
        }
        var waited = false
        while watermark < offset && !finished && failure == nil {
            if !waited { waitingFor.append(offset) }
            waited = true
            condition.wait()
        }
        if waited, let i = waitingFor.firstIndex(of: offset) { waitingFor.remove(at: i) }
        if let failure { throw failure }
        return waited
    }

    /// Whether a reader is waiting for bytes the fill has not reached: a card held back by
    /// the decoder (the block-parallel xz fill then starts another decoder thread).
    var readerWaiting: Bool {
        condition.withLock { waitingFor.contains { $0 > watermark } }
    }

    /// Keeps the fill at most `lead` bytes ahead of the furthest byte a reader has asked for,
    /// and before any reader has asked, within the first `startLead` bytes.
    ///
    /// Why: decoding ahead of every card is work no card needs yet, and on a 2-core station
    /// it took the CPUs just when a batch's cards run their capacity probes (issue 18): at
    /// the start of a 32-card batch the zstd fill used a sixth of both CPUs' time in the
    /// first 0.4 s, while no card could read a byte. Paced, the fill decodes what the first
    /// chunks need, waits until a card starts writing, then stays `lead` ahead of the
    /// fastest card: the same work, spread over the write. A card that catches up with the
    /// fill is always let through (the bytes it waits for are below its own request).
    public func pace(lead: UInt64, startLead: UInt64) {
        condition.withLock {
            self.lead = lead
            self.startLead = startLead
            condition.broadcast()
        }
    }

    /// The fill runs as fast as it can from now on: no one reads it any more (it finishes for
    /// the next card), or it is ending.
    public func stopPacing() {
        condition.withLock {
            lead = nil
            condition.broadcast()
        }
    }

    /// How many times the fill waited for its readers.
    public var pauses: Int { condition.withLock { pauseCount } }

    /// The fill's side of pacing: returns when decoding from `offset` on keeps within the lead
    /// (at once when not paced).
    func paceBefore(_ offset: UInt64) {
        condition.lock()
        defer { condition.unlock() }
        var paused = false
        while let lead, !finished, offset >= furthest + (anyReader ? lead : startLead) {
            if !paused {
                paused = true
                pacers += 1
                pauseCount += 1
                pausedAt?(offset)
                // For `waitForPause` (readers woken by it look again and wait on).
                condition.broadcast()
            }
            condition.wait()
        }
        if paused { pacers -= 1 }
    }

    /// Test seam: waits up to `seconds` for the fill to end, without asking for bytes as a
    /// reader does (so without moving the pace); whether it ended.
    func waitForEnd(seconds: Double) -> Bool {
        let deadline = Date(timeIntervalSinceNow: seconds)
        return condition.withLock {
            while !finished {
                if !condition.wait(until: deadline) { return finished }
            }
            return true
        }
    }

    /// Test seam: waits up to `seconds` until the fill waits for its readers (or ends);
    /// whether it is waiting for them.
    func waitForPause(seconds: Double) -> Bool {
        let deadline = Date(timeIntervalSinceNow: seconds)
        return condition.withLock {
            while pacers == 0 && !finished {
                if !condition.wait(until: deadline) { break }
            }
            return pacers > 0
        }
    }

    /// Test seam: called on the filling thread, with the fill's lock held (it must not call
    /// back into the fill), each time the fill starts waiting for its readers before `offset`.
    nonisolated(unsafe) var pausedAt: ((UInt64) -> Void)?

    func advance(to offset: UInt64) {
        condition.lock()
        watermark = max(watermark, offset)
        let mark = watermark
        condition.broadcast()
        condition.unlock()
        afterAdvance?(mark)
    }

    /// Test seam: runs on the filling thread after every advance, with the new watermark
    /// (a test checks the bytes below it there, at every advance, whatever the machine's load).
    nonisolated(unsafe) var afterAdvance: ((UInt64) -> Void)?

    func finish(error: ImageIOError? = nil) {
        condition.lock()
        finished = true
        failure = error
        condition.broadcast()
        condition.unlock()
    }

    public var isComplete: Bool { condition.withLock { finished && failure == nil } }
    public var error: ImageIOError? { condition.withLock { failure } }
}

/// How a cache fill decodes its image.
public struct CacheFillReport: Sendable, Equatable {
    /// 1: the image's own stream decoder on the filling thread; more: a multi-block .xz
    /// decoded block by block on that many threads (`ParallelXZFill`; those started so far).
    public var decoderThreads: Int
    /// For the block-parallel path: the file's blocks, those decoded (counted when the fill
    /// ends), and those skipped undecoded because they hold no mapped byte.
    public var blocks: Int? = nil
    public var blocksDecoded: Int? = nil
    public var blocksSkipped: Int? = nil
    /// Bytes of decoded blocks after their last mapped byte, left undecoded (the bmap's
    /// checksums standing in for the blocks' own checks; see `ParallelXZFill`).
    public var tailBytesSkipped: UInt64? = nil
}

/// What `CacheFiller.plan` decided, before the fill starts (the caller can say it).
public struct CacheFillPlan: Sendable {
    let xz: XZFillPlan?
    /// 1 for the serial decoder; for the block-parallel one, the most it may run.
    public var decoderThreads: Int { xz?.workers ?? 1 }
    /// The block-parallel decoder starts with one thread and adds the others only while a
    /// card waits for it (see `ParallelXZFill`); false when told a thread count.
    public var addsThreadsOnDemand: Bool { xz.map { $0.initialWorkers < $0.workers } ?? false }
    /// For `CacheFill.pace`: how far ahead of the fastest card the fill may decode. 32 MiB
    /// is 0.3 s of a 100 MB/s card, more than a MiB of zstd or gzip takes to decode; an .xz
    /// file's blocks are decoded whole, so at least two of its largest are let ahead (the
    /// next one is decoding while the card reads the one before).
    public var lead: UInt64 { max(32 << 20, 2 * (xz?.blocks.map(\.uncompressedSize).max() ?? 0)) }
    /// Before any card reads: the first chunks a card writes (an .xz file's first block whole).
    public var startLead: UInt64 { 8 << 20 }
}

/// Decompresses an image once into a cache file: only the bmap's mapped ranges when there is
/// a bmap (the rest stays a hole), all of it otherwise. Runs on the calling thread, with
/// decoder threads of its own for a multi-block .xz file (see `ParallelXZFill`).
public enum CacheFiller {
    /// Reads `source` from its position to the end of its stream, for what lies there: the
    /// container's checksum of the whole stream (zstd's XXH64, gzip's CRC-32, xz's checks),
    /// which is checked only when the decoder reaches it, and, without a bmap, any image
    /// bytes past `size`. `size` came from the container's header (a zstd file's first frame,
    /// a gzip file's last member): a file of several frames or members holds more than it says,
    /// and cards written from a cache of `size` bytes would hold an image cut short, verified
    /// against the same cut. (With a bmap, bytes past the last mapped range are unmapped, and
    /// the image ending past `size` is the bmap's mismatch.)
    static func drain(_ source: ImageSource, size: UInt64, bmap: Bmap?, scratch: UnsafeMutableRawBufferPointer) throws(ImageIOError) {
        while true {
            let from = source.position
            let n = try source.read(into: scratch.baseAddress!, count: scratch.count)
            if n == 0 { return }
            guard source.position > size else { continue }
            if let bmap {
                throw ImageIOError(.bmapMismatch, "bmap \(bmap.path) belongs to a different image: \(source.path) is longer than the bmap's \(size) bytes")
            }
            throw ImageIOError(.imageCorrupt, "\(source.path) holds more than the \(size) bytes its \(source.format.rawValue) header declares (more data from byte \(max(from, size)) on: "
                + "a file of several frames or members?); write it with a bmap, or decompress it once and use the raw image")
        }
    }

    /// Reads what deciding needs (an .xz file's index and block headers: a few KiB).
    /// `xzThreads` overrides the thread count the way `PROVISION_XZ_THREADS` does.
    public static func plan(source: ImageSource, bmap: Bmap?, size: UInt64, xzThreads: Int? = nil) -> CacheFillPlan {
        CacheFillPlan(xz: ParallelXZFill.plan(source: source, bmap: bmap, size: size, threads: xzThreads))
    }

    public static func fill(source: ImageSource, bmap: Bmap?, size: UInt64, into path: String, progress: CacheFill, plan: CacheFillPlan? = nil) {
        if let xz = (plan ?? Self.plan(source: source, bmap: bmap, size: size)).xz {
            do throws(ImageIOError) {
                try ParallelXZFill.run(xz, imagePath: source.path, bmap: bmap, size: size, into: path, progress: progress)
                progress.finish()
            } catch {
                progress.finish(error: error)
            }
            return
        }
        progress.record(CacheFillReport(decoderThreads: 1))
        // No O_TRUNC: readers may already have the (empty) file open.
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            progress.finish(error: ImageIOError(.ioError, "cannot create the image cache file \(path): \(String(cString: strerror(errno)))"))
            return
        }
        defer { close(fd) }
        // 1 MiB: the cards reading the cache are told of every MiB as it lands, and the filler
        // adds 1 MiB, not 4, to a batch's peak memory (issue 18).
        let chunk = 1 << 20
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        do throws(ImageIOError) {
            guard ftruncate(fd, off_t(size)) == 0 else {
                throw ImageIOError(.ioError, "cannot size the image cache file \(path): \(String(cString: strerror(errno)))")
            }
            let ranges: [(start: UInt64, end: UInt64)] = bmap?.mappedByteRanges ?? [(start: UInt64(0), end: size)]
            // The bmap's checksums are checked here, once for every card reading the cache; they
            // prove all the cache holds, so the container's checksum is not computed as well.
            var rangeCheck = bmap.map { BmapRangeChecker(bmap: $0) }
            if bmap?.checksumsEveryRange == true { source.skipStreamChecksum() }
            for (start, end) in ranges {
                if start > source.position {
                    progress.paceBefore(source.position)
                    try source.skip(start - source.position, scratch: buffer)
                }
                progress.advance(to: start)
                var pos = start
                while pos < end {
                    progress.paceBefore(pos)
                    let n = try source.read(into: buffer.baseAddress!, count: Int(min(UInt64(chunk), end - pos)))
                    if n == 0 { break }
                    try rangeCheck?.feed(UnsafeRawBufferPointer(start: buffer.baseAddress!, count: n), at: pos)
                    if case .failure(let e) = Syscall.pwriteAll(fd, buffer.baseAddress!, n, pos) {
                        throw ImageIOError(.ioError, "cannot write the image cache file \(path) at offset \(pos): \(e)", offset: pos, errno: e)
                    }
                    pos += UInt64(n)
                    progress.advance(to: pos)
                }
                if pos < end && bmap != nil {
                    throw ImageIOError(.bmapMismatch, "bmap \(bmap!.path) belongs to a different image: \(source.path) ends at byte \(pos), the bmap maps data up to \(end)")
                }
            }
            if bmap?.checksumsEveryRange != true { try drain(source, size: size, bmap: bmap, scratch: buffer) }
            progress.finish()
        } catch {
            progress.finish(error: error)
        }
    }
}
