#if canImport(Glibc)
import Glibc
#endif
import CLZMA
import Foundation
import ProvisionCShims

/// Decodes the blocks of a multi-block .xz image on several threads straight into the cache
/// file (issue 18).
///
/// Why: a batch's fastest cards (40 MB/s) outran the one xz thread decoding for all of them
/// (~4.1 s of CPU for 144 MiB mapped), and on a 2-core station that thread also competes
/// with the loop devices' kernel workers. `xz -T0` (how Raspberry Pi OS and Armbian images
/// are made) cuts an image into independent blocks listed in the stream's index, so each
/// block can be decoded alone and written at its own offset. liblzma's own threaded decoder
/// would do the decoding, but it holds whole blocks in memory (~60 MiB for 12 MiB blocks);
/// here each worker holds its dictionary and two 1 MiB buffers, and writes as it goes.
///
/// With a bmap that checksums every range, a block is decoded only up to its last mapped byte.
///
/// Cards still see one growing prefix: the calling thread advances the fill's watermark only
/// over bytes every earlier block has written, after feeding them, in order, to the bmap's
/// range checks (read back from the cache file: the page cache, not the disk).
///
/// As fast as the cards need, not faster: the fill starts one worker and adds the next (up to
/// the plan's count) only when, at an advance of the watermark, a card is still waiting for
/// bytes beyond it. Two workers from the start took both CPUs of a 2-core station just while
/// its 32 cards ran their capacity probes, hundreds of small I/Os each that wait for a CPU at
/// every completion: the 40 MB/s cards reached their first image byte 0.19–0.38 s after
/// their job began instead of 0.13 s (up to 1.08× their time alone), while one worker kept
/// ahead of them all (`benchmarks/batch32.sh`, README). A card that catches up with one
/// worker (a slower host) gets the second within a MiB of decoding. In the station the fill
/// is also paced (`CacheFill.pace`): a worker takes a block only while it starts within the
/// fill's lead of the furthest byte a card asked for.
enum ParallelXZFill {
    /// What all workers together may hold: the station keeps the daemon under 128 MiB of
    /// RSS with 48 MiB of card buffers (issue 18), so decoding gets a slice that fits beside
    /// them. An image made with `xz -3`'s 4 MiB dictionary decodes on 3 threads within it;
    /// `-9`'s 64 MiB dictionary does not fit twice and stays single-threaded.
    static let memoryCap: UInt64 = 24 << 20
    /// Each worker's input and output buffer.
    static let bufferSize = 1 << 20
    /// `PROVISION_XZ_THREADS`, read once: the number of decoder threads for benchmarks (1:
    /// the single-threaded stream decoder; more: that many, whatever the memory cap says).
    static let threadsOverride: Int? = getenv("PROVISION_XZ_THREADS").flatMap { Int(String(cString: $0)) }.flatMap { $0 >= 1 ? $0 : nil }

    /// The blocks to decode and on how many threads; nil when the serial decoder should run:
    /// not a plain .xz file, an index that cannot be read, fewer than two blocks holding
    /// mapped data, or room (cores, memory) for only one worker.
    static func plan(source: ImageSource, bmap: Bmap?, size: UInt64, threads: Int? = nil) -> XZFillPlan? {
        let requested = threads ?? threadsOverride
        guard source.format == .xz, source.archiveFilter == nil, source.isFile, requested != 1 else { return nil }
        guard case .success(let fd) = Syscall.open(source.path, flags: O_RDONLY) else { return nil }
        defer { Syscall.close(fd) }
        guard case .success(let st) = Syscall.fstat(fd), let blocks = XZBlockIndex.read(fd: fd, fileSize: UInt64(st.st_size)) else { return nil }
        let ranges = bmap?.mappedByteRanges ?? [(start: UInt64(0), end: size)]
        let mapped = mappedFlags(blocks, ranges)
        let mappedCount = mapped.filter { $0 }.count
        guard mappedCount >= 2 else { return nil }
        // The largest decoder among the blocks to decode (one header read each: ~1 KiB).
        let scratch = UnsafeMutablePointer<UInt8>.allocate(capacity: 1024)
        defer { scratch.deallocate() }
        var decoderMemory: UInt64 = 0
        for (block, isMapped) in zip(blocks, mapped) where isMapped {
            // A damaged header is the worker's to report, with the block's number.
            // So is a filter chain liblzma cannot size (UINT64_MAX).
            guard let header = try? XZBlockHeader.read(fd: fd, block: block, scratch: scratch), header.decoderMemory != UInt64.max else { continue }
            decoderMemory = max(decoderMemory, header.decoderMemory)
        }
        let workerMemory = decoderMemory + 2 * UInt64(bufferSize)
        let fitting = Int(min(memoryCap / workerMemory, 1024))
        let workers = min(requested ?? min(ProcessInfo.processInfo.activeProcessorCount, fitting), mappedCount)
        guard workers >= 2 else { return nil }
        // A count asked for (tests, benchmarks) starts at once; the fill's own grows on demand.
        return XZFillPlan(blocks: blocks, mapped: mapped, workers: workers, initialWorkers: requested == nil ? 1 : workers,
                          ignoresCheck: bmap?.checksumsEveryRange == true)
    }

    /// Which blocks hold at least one mapped byte.
    static func mappedFlags(_ blocks: [XZBlock], _ ranges: [(start: UInt64, end: UInt64)]) -> [Bool] {
        var r = 0
        return blocks.map { block in
            while r < ranges.count && ranges[r].end <= block.uncompressedOffset { r += 1 }
            return r < ranges.count && ranges[r].start < block.uncompressedEnd && ranges[r].start < ranges[r].end
        }
    }

    /// Fills `cachePath` as `plan` says. Every worker is joined and every descriptor, buffer
    /// and decoder freed before this returns or throws.
    static func run(_ plan: XZFillPlan, imagePath: String, bmap: Bmap?, size: UInt64, into cachePath: String, progress: CacheFill) throws(ImageIOError) {
        let imageFD: Int32
        switch Syscall.open(imagePath, flags: O_RDONLY) {
        case .success(let f): imageFD = f
        case .failure(let e): throw ImageIOError(.imageUnreadable, "cannot open image \(imagePath): \(e)", errno: e)
        }
        defer { Syscall.close(imageFD) }
        // No O_TRUNC: readers may already have the (empty) file open.
        let cacheFD: Int32
        switch Syscall.open(cachePath, flags: O_RDWR | O_CREAT, mode: 0o600) {
        case .success(let f): cacheFD = f
        case .failure(let e): throw ImageIOError(.ioError, "cannot create the image cache file \(cachePath): \(e)", errno: e)
        }
        defer { Syscall.close(cacheFD) }
        guard ftruncate(cacheFD, off_t(size)) == 0 else {
            throw ImageIOError(.ioError, "cannot size the image cache file \(cachePath): \(String(cString: strerror(errno)))")
        }
        let ranges = bmap?.mappedByteRanges ?? [(start: UInt64(0), end: size)]
        let work = XZFillWork(plan: plan, imagePath: imagePath, cachePath: cachePath, imageFD: imageFD, cacheFD: cacheFD, ranges: ranges, progress: progress)
        var threads: [JoinableThread] = []
        func report(decoded: Int, tail: UInt64) {
            progress.record(CacheFillReport(decoderThreads: threads.count, blocks: plan.blocks.count, blocksDecoded: decoded,
                                            blocksSkipped: plan.mapped.filter { !$0 }.count, tailBytesSkipped: tail))
        }
        defer {
            work.stop()
            // A worker waiting for the cards (pacing) is let go, to see the stop.
            progress.stopPacing()
            for t in threads { t.join() }
            report(decoded: work.decodedCount, tail: work.tailBytesSkipped)
        }
        func startWorker() throws(ImageIOError) {
            guard let t = JoinableThread(name: "prov-xz-fill-\(threads.count)", body: { work.runWorker() }) else {
                throw ImageIOError(.ioError, "cannot start an xz decoder thread: \(String(cString: strerror(errno)))")
            }
            threads.append(t)
            report(decoded: 0, tail: 0)
        }
        for _ in 0..<plan.initialWorkers { try startWorker() }
        var mayGrow = plan.workers > threads.count
        try coordinate(work, bmap: bmap, ranges: ranges, size: size, progress: progress) {
            // A card waits beyond what was just released: the decoding holds it back. (A
            // helper the system will not start leaves the fill to the workers it has.)
            guard mayGrow, work.hasUnclaimedBlock, progress.readerWaiting else { return }
            mayGrow = (try? startWorker()) != nil && threads.count < plan.workers
        }
    }

    /// The calling thread's part: moves the watermark over the contiguous prefix the workers
    /// have written, checking it against the bmap first. Wakes on every worker report.
    private static func coordinate(_ work: XZFillWork, bmap: Bmap?, ranges: [(start: UInt64, end: UInt64)], size: UInt64, progress: CacheFill,
                                   afterAdvance: () -> Void) throws(ImageIOError) {
        var rangeCheck = bmap.map { BmapRangeChecker(bmap: $0) }
        let readBack = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 4096)
        defer { readBack.deallocate() }
        var checked: UInt64 = 0
        var nextRange = 0
        while true {
            let (target, allDone) = try work.awaitFrontier(beyond: checked, limit: size)
            if target > checked, rangeCheck != nil {
                // The newly contiguous mapped bytes, in order, as the serial fill feeds them.
                while nextRange < ranges.count && ranges[nextRange].start < target {
                    let (start, end) = ranges[nextRange]
                    var pos = max(start, checked)
                    let stop = min(end, target)
                    while pos < stop {
                        let n = Int(min(UInt64(bufferSize), stop - pos))
                        switch Syscall.preadFully(work.cacheFD, readBack.baseAddress!, n, pos) {
                        case .success(n): break
                        case .success: throw ImageIOError(.ioError, "the image cache file \(work.cachePath) is shorter than \(pos + UInt64(n)) bytes")
                        case .failure(let e): throw ImageIOError(.ioError, "cannot read back the image cache file \(work.cachePath) at offset \(pos): \(e)", offset: pos, errno: e)
                        }
                        do {
                            try rangeCheck!.feed(UnsafeRawBufferPointer(start: readBack.baseAddress!, count: n), at: pos)
                        } catch {
                            work.fail(error)
                            throw error
                        }
                        pos += UInt64(n)
                    }
                    if end > target { break }
                    nextRange += 1
                }
            }
            if target > checked {
                checked = target
                progress.advance(to: checked)
                afterAdvance()
            }
            guard allDone else { continue }
            // Every block is written: the image may still end before the bmap's last range.
            if let bmap, let short = ranges.first(where: { $0.end > work.uncompressedSize }) {
                let endsAt = max(short.start, work.uncompressedSize)
                throw ImageIOError(.bmapMismatch, "bmap \(bmap.path) belongs to a different image: \(work.imagePath) ends at byte \(endsAt), the bmap maps data up to \(short.end)")
            }
            return
        }
    }
}

/// What `ParallelXZFill.plan` decided.
struct XZFillPlan: Sendable {
    let blocks: [XZBlock]
    /// Per block: whether it holds mapped data (only those are decoded).
    let mapped: [Bool]
    /// The most workers the fill may run, and how many it starts with.
    let workers: Int
    let initialWorkers: Int
    /// The bmap checksums every mapped range: the blocks' own checks are redundant (as
    /// `ImageSource.skipStreamChecksum` says for the serial decoder).
    let ignoresCheck: Bool
}

/// The state the workers and the coordinator share, under one condition.
private final class XZFillWork: @unchecked Sendable {
    let plan: XZFillPlan
    let imagePath: String
    let cachePath: String
    let imageFD: Int32
    let cacheFD: Int32
    let ranges: [(start: UInt64, end: UInt64)]
    let uncompressedSize: UInt64
    /// The fill's progress: a worker waits there before a block too far ahead of the cards.
    let progress: CacheFill

    private let condition = NSCondition()
    /// Indices (into plan.blocks) of the blocks to decode, in file order.
    private let queue: [Int]
    private var nextClaim = 0
    /// Per block: bytes written so far, and whether it is complete.
    private var written: [UInt64]
    private var complete: [Bool]
    /// The lowest block not complete (skipped blocks count as complete).
    private var lowest = 0
    private var failure: ImageIOError?
    private var stopping = false
    private(set) var decodedCount = 0
    private(set) var tailBytesSkipped: UInt64 = 0

    init(plan: XZFillPlan, imagePath: String, cachePath: String, imageFD: Int32, cacheFD: Int32, ranges: [(start: UInt64, end: UInt64)], progress: CacheFill) {
        self.plan = plan
        self.progress = progress
        self.imagePath = imagePath
        self.cachePath = cachePath
        self.imageFD = imageFD
        self.cacheFD = cacheFD
        self.ranges = ranges
        self.uncompressedSize = plan.blocks.last?.uncompressedEnd ?? 0
        self.queue = plan.mapped.indices.filter { plan.mapped[$0] }
        self.written = plan.blocks.map { _ in 0 }
        self.complete = plan.mapped.map { !$0 }
    }

    func stop() {
        condition.withLock { stopping = true; condition.broadcast() }
    }

    /// A block no worker has taken yet (another worker would have something to do).
    var hasUnclaimedBlock: Bool { condition.withLock { nextClaim < queue.count } }

    func fail(_ error: ImageIOError) {
        condition.withLock {
            if failure == nil { failure = error }
            stopping = true
            condition.broadcast()
        }
    }

    /// Waits until the contiguous prefix, cut at `limit` (the cache file's size), passes
    /// `checked` or every block is complete; throws a worker's failure.
    func awaitFrontier(beyond checked: UInt64, limit: UInt64) throws(ImageIOError) -> (frontier: UInt64, allDone: Bool) {
        condition.lock()
        defer { condition.unlock() }
        while true {
            if let failure { throw failure }
            while lowest < complete.count && complete[lowest] { lowest += 1 }
            let blocks = plan.blocks
            let frontier = min(limit, lowest < blocks.count ? blocks[lowest].uncompressedOffset + written[lowest] : uncompressedSize)
            let allDone = lowest == blocks.count
            if frontier > checked || allDone { return (frontier, allDone) }
            condition.wait()
        }
    }

    /// A worker: claims blocks in file order until none is left or the fill stops.
    func runWorker() {
        let input = UnsafeMutablePointer<UInt8>.allocate(capacity: ParallelXZFill.bufferSize)
        let output = UnsafeMutableRawPointer.allocate(byteCount: ParallelXZFill.bufferSize, alignment: 4096)
        // One decoder for all of this worker's blocks: liblzma keeps its dictionary when it is
        // started again with the same size, instead of a fresh 4 MiB (page faults) per block.
        var stream = lzma_stream()
        defer {
            lzma_end(&stream)
            input.deallocate()
            output.deallocate()
        }
        while true {
            let claimed: Int? = condition.withLock {
                guard !stopping, nextClaim < queue.count else { return nil }
                defer { nextClaim += 1 }
                return queue[nextClaim]
            }
            guard let index = claimed else { return }
            let block = plan.blocks[index]
            // Not further ahead of the cards than the fill's lead (when paced); the block at the
            // frontier always passes, as a card waits below its start.
            progress.paceBefore(block.uncompressedOffset)
            if condition.withLock({ stopping }) { return }
            do throws(ImageIOError) {
                let stopAt = stopOffset(in: block)
                let finished = try decode(block, stoppingAt: stopAt, with: &stream, input: input, output: output) { done in
                    self.condition.withLock {
                        self.written[index] = done
                        self.condition.broadcast()
                        return !self.stopping
                    }
                }
                guard finished else { return }
                condition.withLock {
                    written[index] = block.uncompressedSize
                    complete[index] = true
                    decodedCount += 1
                    tailBytesSkipped += block.uncompressedSize - stopAt
                    condition.broadcast()
                }
            } catch {
                fail(error)
                return
            }
        }
    }

    /// How much of `block` (bytes from its start) must be decoded: all of it, unless the bmap
    /// checksums every range (its own check is then ignored) — then up to its last mapped
    /// byte. What follows is never written anywhere, and it is not free to decode: zeros
    /// decode at ~430 MB/s here, and the 512 MiB image of `benchmarks/batch32.sh` has 150 MiB
    /// of its blocks' tails after their last mapped byte, ~10 % of the decoders' CPU.
    private func stopOffset(in block: XZBlock) -> UInt64 {
        guard plan.ignoresCheck else { return block.uncompressedSize }
        var r = firstRange(endingAfter: block.uncompressedOffset)
        var last = block.uncompressedOffset
        while r < ranges.count && ranges[r].start < block.uncompressedEnd {
            if ranges[r].end > ranges[r].start { last = max(last, min(ranges[r].end, block.uncompressedEnd)) }
            r += 1
        }
        return last > block.uncompressedOffset ? last - block.uncompressedOffset : block.uncompressedSize
    }

    /// Decodes one block up to `stopAt` bytes from its start (see `stopOffset`), writing the
    /// bytes inside mapped ranges at their offsets and telling `report` how many of the
    /// block's bytes are written (false back: stop); the bytes after `stopAt` count as written
    /// once it is reached (they are holes). Returns false when stopped early.
    private func decode(_ block: XZBlock, stoppingAt stopAt: UInt64, with stream: inout lzma_stream, input: UnsafeMutablePointer<UInt8>,
                        output: UnsafeMutableRawPointer, report: (UInt64) -> Bool) throws(ImageIOError) -> Bool {
        func corrupt(_ why: String) -> ImageIOError {
            ImageIOError(.compressedStreamCorrupt, "xz block \(block.number) of \(imagePath), at byte \(block.compressedOffset) of the file, is corrupt: \(why)", offset: block.compressedOffset)
        }
        let header: XZBlockHeader
        do {
            header = try XZBlockHeader.read(fd: imageFD, block: block, scratch: input)
        } catch {
            switch error {
            case .corrupt(let why): throw corrupt(why)
            case .unreadable(let why): throw ImageIOError(.imageUnreadable, "cannot read xz block \(block.number) of \(imagePath) at byte \(block.compressedOffset): \(why)", offset: block.compressedOffset)
            }
        }
        // The filter chain the options point to lives as long as `header`.
        defer { withExtendedLifetime(header) {} }
        var options = header.options
        options.ignore_check = plan.ignoresCheck ? 1 : 0
        let rc = lzma_block_decoder(&stream, &options)
        guard rc == LZMA_OK else {
            throw rc == LZMA_MEM_ERROR ? ImageIOError(.ioError, "out of memory for the decoder of xz block \(block.number) of \(imagePath)") : corrupt("liblzma refuses its options (\(rc.rawValue))")
        }
        let capacity = ParallelXZFill.bufferSize
        // A block stopped short (see `stopOffset`) leaves input unread: none of it is this block's.
        stream.avail_in = 0
        var inPos = block.compressedOffset + UInt64(options.header_size)
        let inEnd = block.compressedOffset + block.totalSize
        var done: UInt64 = 0
        var filled = 0
        var range = firstRange(endingAfter: block.uncompressedOffset)
        let stopsShort = stopAt < block.uncompressedSize
        while true {
            if stream.avail_in == 0 && inPos < inEnd {
                let want = Int(min(UInt64(capacity), inEnd - inPos))
                switch Syscall.preadFully(imageFD, input, want, inPos) {
                case .success(0): throw corrupt("the file ends inside it")
                case .success(let n):
                    stream.next_in = UnsafePointer(input)
                    stream.avail_in = n
                    inPos += UInt64(n)
                case .failure(let e):
                    throw ImageIOError(.imageUnreadable, "cannot read image \(imagePath) at byte \(inPos): \(e)", offset: inPos, errno: e)
                }
            }
            // Never past a `stopAt` short of the block's end: the decoder stops there by itself
            // (avail_out 0), without reading the compressed bytes of what follows. (At the
            // block's end it needs room to go on to its padding and check.)
            let room = stopsShort ? min(capacity - filled, Int(stopAt - done) - filled) : capacity - filled
            stream.next_out = (output + filled).assumingMemoryBound(to: UInt8.self)
            stream.avail_out = room
            let rc = lzma_code(&stream, inPos >= inEnd ? LZMA_FINISH : LZMA_RUN)
            filled += room - stream.avail_out
            let stopped = stopsShort && done + UInt64(filled) == stopAt && (rc == LZMA_OK || rc == LZMA_STREAM_END)
            if filled == capacity || (rc == LZMA_STREAM_END && filled > 0) || stopped {
                try writeMapped(output, count: filled, at: block.uncompressedOffset + done, from: &range)
                done += UInt64(filled)
                filled = 0
                if stopped { return report(block.uncompressedSize) }
                // The block's last bytes count as written only once its check has been
                // verified (STREAM_END): cards never read past an unverified block end.
                if done < block.uncompressedSize || rc == LZMA_STREAM_END {
                    guard report(done) else { return false }
                }
            }
            switch rc {
            case LZMA_OK: continue
            case LZMA_STREAM_END: return true
            case LZMA_BUF_ERROR: throw corrupt("its data ends before the block does")
            case LZMA_DATA_ERROR: throw corrupt("its compressed data is damaged (or does not match the index)")
            case LZMA_OPTIONS_ERROR: throw corrupt("it uses options this liblzma does not support")
            case LZMA_MEM_ERROR: throw ImageIOError(.ioError, "out of memory while decoding xz block \(block.number) of \(imagePath)")
            default: throw corrupt("xz decoder error \(rc.rawValue)")
            }
        }
    }

    private func firstRange(endingAfter offset: UInt64) -> Int {
        var low = 0, high = ranges.count
        while low < high {
            let mid = (low + high) / 2
            if ranges[mid].end <= offset { low = mid + 1 } else { high = mid }
        }
        return low
    }

    /// Writes the part of `count` decoded bytes at image offset `offset` that lies inside
    /// mapped ranges (the rest stays a hole, as in the serial fill).
    private func writeMapped(_ bytes: UnsafeMutableRawPointer, count: Int, at offset: UInt64, from range: inout Int) throws(ImageIOError) {
        let end = offset + UInt64(count)
        while range < ranges.count && ranges[range].end <= offset { range += 1 }
        var r = range
        while r < ranges.count && ranges[r].start < end {
            let s = max(ranges[r].start, offset), e = min(ranges[r].end, end)
            if s < e, case .failure(let err) = Syscall.pwriteAll(cacheFD, bytes + Int(s - offset), Int(e - s), s) {
                throw ImageIOError(.ioError, "cannot write the image cache file \(cachePath) at offset \(s): \(err)", offset: s, errno: err)
            }
            if ranges[r].end > end { break }
            r += 1
        }
    }
}

/// A thread that is joined, not detached: the fill returns only once its workers are gone.
final class JoinableThread {
    private let handle: pthread_t

    /// nil when the system refuses another thread (errno says why).
    init?(name: String, body: @escaping @Sendable () -> Void) {
        final class Start { let name: String; let body: @Sendable () -> Void; init(_ n: String, _ b: @escaping @Sendable () -> Void) { name = n; body = b } }
        let start = Unmanaged.passRetained(Start(name, body))
        var handle = pthread_t()
        let rc = pthread_create(&handle, nil, { argument in
            let start = Unmanaged<Start>.fromOpaque(argument!).takeRetainedValue()
            provision_name_thread(start.name)
            start.body()
            return nil
        }, start.toOpaque())
        guard rc == 0 else {
            start.release()
            errno = rc
            return nil
        }
        self.handle = handle
    }

    func join() { pthread_join(handle, nil) }
}
