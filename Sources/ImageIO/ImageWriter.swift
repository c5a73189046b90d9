#if canImport(Glibc)
import Glibc
#endif
import Crypto
import Foundation
import ProvisionCShims
import SystemPackage

/// Writes one image to one target and proves it (DESIGN.md §4).
///
/// A pipeline of threads: a reader that decompresses into a bounded ring of aligned buffers;
/// a checker that checks the stream against the bmap and fingerprints each chunk (when there
/// is anything to check); the calling thread, which writes them with `pwrite`; and the
/// verifier's two threads, which read back what is synced and compare it. The
/// chunk holding offset 0 (the partition table) is held back and written only after
/// everything else is on the card and synced: an interrupted write then leaves a card that
/// does not boot, rather than one that boots into half an image.
public enum ImageWriter {
    /// What a card on a station's budget reads back at a time (`BackgroundVerifier.piece`).
    public static let readBackPiece = 256 << 10

    public static func write(source: ImageSource, to target: WriteTarget, options: WriteOptions = WriteOptions(),
                             progress: @escaping @Sendable (WriteProgress) -> Void = { _ in }) throws(ImageIOError) -> WriteResult {
        let job = WriteJob(source: source, target: target, options: options, progress: progress)
        return try job.run()
    }
}

/// The state of one write; lives for the duration of `ImageWriter.write`.
final class WriteJob: @unchecked Sendable {
    let source: ImageSource
    let target: WriteTarget
    let options: WriteOptions
    let progress: @Sendable (WriteProgress) -> Void
    let pool: BufferPool
    let queue = ChunkQueue()
    /// Unit of direct I/O: lengths and offsets must be multiples of it.
    let ioUnit: Int
    /// Raw and cached sources can be read again at any offset: verification then compares
    /// the card with the source bytes directly (exact offset, no hashing); compressed
    /// streams are verified against fingerprints taken as they streamed by.
    let compareWithSource: Bool
    /// A second descriptor on a raw source, for verification's reads.
    /// Opened with the job (not lazily: a lazy property read first by deinit would open it
    /// there), closed by deinit; -1 when nothing compares with the source.
    let sourceFD: Int32

    deinit { if sourceFD >= 0 { Syscall.close(sourceFD) } }

    /// The raw image file as the write found it. Card and verification both read the file as
    /// it is at that moment, so a file rebuilt in place meanwhile (`cp new.img image.img`, a
    /// build writing its output) would leave a card of both versions, verified or "repaired".
    private let sourceStamp: FileStamp?

    /// The error for a raw image that changed since the write began; nil while it has not.
    func sourceChangedError() -> ImageIOError? {
        guard let sourceStamp, FileStamp(fd: sourceFD) != sourceStamp else { return nil }
        return ImageIOError(.imageUnreadable, "\(source.path) changed while it was written to \(target.path) (its size or modification time): the card may hold parts of both versions; write it again")
    }

    private var streamEnd: UInt64 = 0
    private(set) var verifier: BackgroundVerifier?
    /// The bmap range check of the source, unless a cache filler did it already.
    var checksSourceAgainstBmap: Bool { options.bmap != nil && !options.sourceCheckedAgainstBmap }
    /// Hashing (the bmap range check, chunk fingerprints) runs on a thread of its own between the
    /// decompressor and the writer, so that decompressing and hashing use both cores. With
    /// blobs it stays on the reader: the range check must see the image's bytes before the
    /// blobs are laid over them.
    private lazy var checkStage: ChunkQueue? = options.blobs.isEmpty && (checksSourceAgainstBmap || fingerprintsChunks) ? ChunkQueue() : nil
    /// Chunks carry a fingerprint for the verifier: compressed sources, when verifying.
    private var fingerprintsChunks: Bool { options.verify && !compareWithSource }

    init(source: ImageSource, target: WriteTarget, options: WriteOptions, progress: @escaping @Sendable (WriteProgress) -> Void) {
        self.source = source
        self.target = target
        self.options = options
        self.progress = progress
        self.ioUnit = target.direct ? (target.kind == .blockDevice ? target.logicalBlockSize : 4096) : 1
        self.compareWithSource = source.format == .raw && source.isFile
        self.sourceFD = compareWithSource ? ((try? Syscall.open(source.path, flags: O_RDONLY).get()) ?? -1) : -1
        // An operator's raw file (not the station's cache, which grows as it fills).
        self.sourceStamp = source.originalFormat == nil && sourceFD >= 0 ? FileStamp(fd: sourceFD) : nil
        let size = max(options.chunkSize / target.alignment, 1) * target.alignment
        if let budget = options.budget {
            self.pool = BufferPool(budget: budget, maximum: options.bufferCount, bufferSize: size, alignment: target.alignment,
                                   cancellation: options.cancellation)
        } else {
            self.pool = BufferPool(count: max(options.bufferCount, 3), bufferSize: size, alignment: target.alignment)
        }
    }

    /// The uncompressed size the image claims, for the too-small check and the progress total.
    var expectedImageSize: UInt64? { options.bmap?.imageSize ?? source.uncompressedSizeHint }

    func run() throws(ImageIOError) -> WriteResult {
        do throws(ImageIOError) { return try writeAndVerify() } catch {
            // A raw image rebuilt in place reads short while `cp` has it truncated: what
            // happened is the rebuild, not a short image.
            if error.code == .imageUnreadable, let changed = sourceChangedError() { throw changed }
            throw error
        }
    }

    private func writeAndVerify() throws(ImageIOError) -> WriteResult {
        try preflight()
        // The bmap check proves every byte written; the container's own checksum would prove
        // the unmapped bytes too, which are never written (see `skipStreamChecksum`).
        if checksSourceAgainstBmap, options.bmap?.checksumsEveryRange == true { source.skipStreamChecksum() }
        if options.verify { verifier = BackgroundVerifier(job: self) }
        // The verifier holds this job (it reads the target and the source through it): the
        // pair is let go here, on every ending, or each write would keep its buffers and the
        // source's descriptors for the life of the daemon (issue 13: 2 fds and 17 MB a card).
        defer { verifier?.stop(); verifier = nil }
        // A budget pool is done with the budget however the write ends.
        defer { pool.close() }
        let started = ContinuousClock.now
        if splicesFromSource, let pipe = SplicePipe() {
            do throws(ImageIOError) { try spliceAll(through: pipe) } catch {
                options.cancellation.cancel()
                pool.close()
                throw error
            }
        } else {
            try readAndWrite()
        }
        let written = ContinuousClock.now

        if options.cancellation.isCancelled { throw cancelledError(after: bytesWrittenSoFar) }
        var verifySeconds = 0.0
        var repairs: [UInt64] = []
        if let verifier {
            options.testHookBeforeVerify?(target)
            let v0 = ContinuousClock.now
            verifier.submit(unverified)
            unverified = []
            try verifier.finish(reportingTo: progress)
            verifySeconds = (ContinuousClock.now - v0) / .seconds(1)
            repairs = verifier.repairs
        }
        if let changed = sourceChangedError() { throw changed }
        progress(WriteProgress(phase: .done, bytesDone: bytesWrittenSoFar, bytesTotal: bytesWrittenSoFar, bytesPerSecond: 0, secondsRemaining: 0))
        return WriteResult(imageFormat: (source.originalFormat ?? source.format).rawValue, imageSize: options.bmap?.imageSize ?? streamEnd,
                           bytesWritten: bytesWrittenSoFar, bmapPath: options.bmap?.path, verified: options.verify,
                           writeSeconds: (written - started) / .seconds(1) - syncSeconds, syncSeconds: syncSeconds,
                           verifySeconds: verifySeconds, repairedAt: repairs.isEmpty ? nil : repairs)
    }

    /// The reader thread (and the checker's, when there is something to check) fills
    /// buffers; the calling thread writes them.
    private func readAndWrite() throws(ImageIOError) {
        let readerDone = DispatchSemaphore(value: 0)
        let stage = checkStage
        let reader = Thread { [self] in
            provision_name_thread("prov-reader")
            do throws(ImageIOError) { try readStream(); (stage ?? queue).finish() } catch { (stage ?? queue).finish(error: error); pool.close() }
            readerDone.signal()
        }
        reader.start()
        let checkerDone = DispatchSemaphore(value: 0)
        if let stage {
            let checker = Thread { [self] in
                provision_name_thread("prov-check")
                check(stage)
                checkerDone.signal()
            }
            checker.start()
        }

        do throws(ImageIOError) {
            try writeAll()
        } catch {
            options.cancellation.cancel()
            pool.close()
            readerDone.wait()
            if stage != nil { checkerDone.wait() }
            throw error
        }
        readerDone.wait()
        if stage != nil { checkerDone.wait() }
    }

    // MARK: - Before the first byte

    private func preflight() throws(ImageIOError) {
        if let bmap = options.bmap {
            try bmap.checkSize(of: source)
            if bmap.blockSize % UInt64(ioUnit) != 0 {
                throw ImageIOError(.bmapInvalid, "bmap block size \(bmap.blockSize) is not a multiple of \(target.path)'s \(ioUnit)-byte blocks")
            }
        }
        if let size = target.size {
            let needed = max(expectedImageSize ?? 0, options.blobs.map { $0.offset + UInt64($0.bytes.count) }.max() ?? 0)
            if needed > size {
                throw ImageIOError(.deviceTooSmall, "card too small: image needs \(needed) bytes, card \(target.path) has \(size)")
            }
        }
        for blob in options.blobs where blob.offset % UInt64(ioUnit) != 0 {
            throw ImageIOError(.invalidArgument, "raw blob \(blob.name) at offset \(blob.offset) is not aligned to the card's \(ioUnit)-byte blocks")
        }
        do { try options.beforeFirstWrite?(target) } catch let e as ImageIOError { throw e } catch {
            throw ImageIOError(.deviceChanged, "\(target.path): \(error)")
        }
        if target.kind == .regularFile { try emptyFileTarget() }
    }

    /// A file target is emptied first, as bmaptool does: what the image leaves unwritten
    /// (unmapped ranges, runs of zeros) then reads as zeros, and the file equals the image
    /// (`cmp IMAGE FILE`) instead of keeping an older file's bytes in the holes.
    private func emptyFileTarget() throws(ImageIOError) {
        var st = stat()
        if fstat(target.fd, &st) == 0, let identity = source.fileIdentity, identity == (UInt64(st.st_dev), UInt64(st.st_ino)) {
            throw ImageIOError(.invalidArgument, "\(target.path) is the image itself: writing it onto itself would destroy it")
        }
        if ftruncate(target.fd, 0) != 0 {
            throw ImageIOError.device(Errno(rawValue: errno), operation: "truncate", path: target.path, offset: nil)
        }
    }

    // MARK: - Reader thread: decompress, overlay blobs; checker thread: bmap check, fingerprint

    private var blobCoverage: [[Range<UInt64>]] = []
    /// The chunk at offset 0 is this long (see `WriteOptions.headSize`), aligned for direct I/O.
    private var headSize: Int {
        max(options.headSize / target.alignment, 1) * target.alignment
    }

    private func readStream() throws(ImageIOError) {
        blobCoverage = Array(repeating: [], count: options.blobs.count)
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 64)
        defer { scratch.deallocate() }
        var rangeCheck = checksSourceAgainstBmap && checkStage == nil ? options.bmap.map { BmapRangeChecker(bmap: $0) } : nil

        if let bmap = options.bmap {
            for extent in bmap.mappedByteRanges {
                if extent.start > source.position { try source.skip(extent.start - source.position, scratch: scratch) }
                var pos = extent.start
                while pos < extent.end {
                    // Chunks end at the head's end, so the held-back head is exactly the first MiB.
                    let n = Int(min(pos < UInt64(headSize) ? min(UInt64(headSize) - pos, UInt64(pool.bufferSize)) : UInt64(pool.bufferSize), extent.end - pos))
                    let late = try source.awaitBytes(upTo: pos + UInt64(n))
                    guard let buf = acquire() else { return }
                    buf.sourceWasLate = late
                    let got = try read(into: buf, count: n)
                    guard got == n else {
                        pool.release(buf)
                        throw ImageIOError(.bmapMismatch, "bmap \(bmap.path) belongs to a different image: \(source.path) ends at byte \(pos + UInt64(got)), the bmap maps data up to \(extent.end)")
                    }
                    buf.offset = pos
                    buf.count = got
                    try rangeCheck?.feed(UnsafeRawBufferPointer(start: buf.bytes, count: got), at: pos)
                    try emit(buf)
                    pos += UInt64(got)
                }
            }
            streamEnd = bmap.imageSize
        } else {
            var pos: UInt64 = 0
            while true {
                let wanted = pos < UInt64(headSize) ? min(headSize - Int(pos), pool.bufferSize) : pool.bufferSize
                let late = try source.awaitBytes(upTo: pos + UInt64(wanted))
                guard let buf = acquire() else { return }
                buf.sourceWasLate = late
                let got = try read(into: buf, count: wanted)
                if got == 0 { pool.release(buf); break }
                buf.offset = pos
                buf.count = got
                try emit(buf)
                pos += UInt64(got)
                if got < wanted { break }
            }
            streamEnd = pos
        }
        try emitUncoveredBlobs()
    }

    /// Reads the next `count` bytes of the image into `buf`, fingerprinting them on the way
    /// when that is this thread's job and nothing will overlay them.
    private func read(into buf: AlignedBuffer, count: Int) throws(ImageIOError) -> Int {
        guard fingerprintsWhileReading else { return try source.read(into: buf.bytes, count: count) }
        var fingerprinter = Fingerprinter()
        let got = try source.read(into: buf.bytes, count: count, adding: &fingerprinter)
        buf.fingerprint = fingerprinter.value
        return got
    }

    private func acquire() -> AlignedBuffer? {
        if options.cancellation.isCancelled { return nil }
        return pool.acquire()
    }

    /// Overlays blob bytes, hashes the chunk, hands it to the writer.
    private func emit(_ buf: AlignedBuffer) throws(ImageIOError) {
        overlayBlobs(on: buf.bytes, at: buf.offset, count: buf.count) { i, overlap in blobCoverage[i].append(overlap) }
        if buf.offset == 0, let inspect = options.inspectFirstChunk {
            do { try inspect(buf.buffer) } catch let e as ImageIOError { pool.release(buf); throw e } catch {
                pool.release(buf)
                throw ImageIOError(.invalidArgument, "\(error)")
            }
        }
        if fingerprintsOnReader && !fingerprintsWhileReading { fingerprint(buf) }
        if let checkStage { checkStage.put(buf) } else { queue.put(buf) }
    }

    /// Copies the blobs' bytes over the `count` image bytes at `bytes` (device offset `offset`);
    /// `laid` hears of each blob's overlap.
    private func overlayBlobs(on bytes: UnsafeMutableRawPointer, at offset: UInt64, count: Int,
                              laid: (Int, Range<UInt64>) -> Void = { _, _ in }) {
        let range = offset..<(offset + UInt64(count))
        for (i, blob) in options.blobs.enumerated() {
            let overlap = range.clamped(to: blob.offset..<(blob.offset + UInt64(blob.bytes.count)))
            guard !overlap.isEmpty else { continue }
            blob.bytes.withUnsafeBytes { src in
                (bytes + Int(overlap.lowerBound - offset)).copyMemory(from: src.baseAddress! + Int(overlap.lowerBound - blob.offset), byteCount: overlap.count)
            }
            laid(i, overlap)
        }
    }

    /// Where chunks are fingerprinted: on the checker thread when it has nothing else to do
    /// (a compressed image without a bmap: the decompressor is the long job), else on the
    /// reader, while the chunk is fresh in its cache (the SHA-256 of the bmap ranges, at
    /// 1.3 GB/s against the fingerprint's 12–35 GB/s, is the longest job of all).
    private var fingerprintsOnReader: Bool { checkStage == nil || checksSourceAgainstBmap }
    /// ... and then in the same pass as the decompressor's copy, unless blobs overlay chunks.
    private var fingerprintsWhileReading: Bool {
        fingerprintsOnReader && fingerprintsChunks && options.blobs.isEmpty
    }

    /// The checker thread: the bmap range check and (see `fingerprintsOnReader`) chunk
    /// fingerprints, in stream order.
    private func check(_ stage: ChunkQueue) {
        var rangeCheck = checksSourceAgainstBmap ? options.bmap.map { BmapRangeChecker(bmap: $0) } : nil
        do {
            while let buf = try stage.take() {
                do throws(ImageIOError) {
                    try rangeCheck?.feed(UnsafeRawBufferPointer(buf.buffer), at: buf.offset)
                } catch {
                    pool.release(buf)
                    throw error
                }
                if !fingerprintsOnReader { fingerprint(buf) }
                queue.put(buf)
            }
            queue.finish()
        } catch {
            queue.finish(error: error)
            pool.close()
        }
    }

    private func fingerprint(_ buf: AlignedBuffer) {
        buf.fingerprint = fingerprintsChunks ? Fingerprint(buf.buffer) : nil
    }

    /// Blob bytes that no image chunk carried (an unmapped area, or beyond the image end).
    private func emitUncoveredBlobs() throws(ImageIOError) {
        for (i, blob) in options.blobs.enumerated() {
            var gaps: [Range<UInt64>] = []
            var cursor = blob.offset
            for c in blobCoverage[i].sorted(by: { $0.lowerBound < $1.lowerBound }) {
                if c.lowerBound > cursor { gaps.append(cursor..<c.lowerBound) }
                cursor = max(cursor, c.upperBound)
            }
            let end = blob.offset + UInt64(blob.bytes.count)
            if cursor < end { gaps.append(cursor..<end) }
            for gap in gaps {
                guard gap.lowerBound % UInt64(ioUnit) == 0 else {
                    throw ImageIOError(.invalidArgument, "raw blob \(blob.name) continues at offset \(gap.lowerBound), which is not aligned to \(ioUnit)-byte blocks")
                }
                var pos = gap.lowerBound
                while pos < gap.upperBound {
                    guard let buf = acquire() else { return }
                    let n = Int(min(UInt64(pool.bufferSize), gap.upperBound - pos))
                    blob.bytes.withUnsafeBytes { src in buf.bytes.copyMemory(from: src.baseAddress! + Int(pos - blob.offset), byteCount: n) }
                    buf.offset = pos
                    buf.count = n
                    fingerprint(buf)
                    queue.put(buf)
                    pos += UInt64(n)
                }
            }
        }
    }

    // MARK: - Writer (calling thread)

    private(set) var bytesWrittenSoFar: UInt64 = 0
    private var syncSeconds = 0.0
    /// Written since the last sync, not yet handed to the verifier.
    private var unverified: [WrittenChunk] = []
    private lazy var tailBlock = AlignedBuffer(capacity: max(ioUnit, target.alignment), alignment: target.alignment)

    private func writeAll() throws(ImageIOError) {
        let total = options.bmap.map { $0.mappedBytes } ?? expectedImageSize
        var meter = PhaseMeter(phase: .writing, total: total)
        progress(withDownload(meter.progress))
        var lastReport = ContinuousClock.now
        var lastWrite: Duration?
        while true {
            let next: AlignedBuffer?
            let asked = ContinuousClock.now
            do { next = try queue.take() } catch let e as ImageIOError { throw e } catch { throw ImageIOError(.ioError, "\(error)") }
            guard let buf = next else { break }
            // Waiting for the next chunk for more than 2 % of the time the last one took to
            // write: one more buffer in flight would keep this card busy (a 10 MB/s card
            // never asks; a fast disk soon does). Only budget pools grow.
            if let lastWrite, !buf.sourceWasLate, (ContinuousClock.now - asked) * 50 > lastWrite { pool.grow() }
            if options.cancellation.isCancelled { pool.release(buf); throw cancelledError(after: bytesWrittenSoFar) }
            if buf.offset < UInt64(headSize) {
                // Written last; see the type's comment. Whatever lies in the first MiB (the
                // partition table, a boot loader at 8 or 300 KiB) waits in `head`.
                let held = min(buf.count, headSize - Int(buf.offset))
                holdBack(UnsafeRawBufferPointer(start: buf.bytes, count: held), at: buf.offset, fingerprint: held == buf.count ? buf.fingerprint : nil)
                meter.add(UInt64(held))
                if held == buf.count { pool.release(buf); continue }
                // A chunk straddling the head's end (a blob): the rest is written now.
                let rest = UnsafeRawBufferPointer(start: buf.bytes + held, count: buf.count - held)
                try writeBytes(rest, at: UInt64(headSize))
                meter.add(UInt64(rest.count))
                unverified.append(WrittenChunk(offset: UInt64(headSize), count: rest.count, fingerprint: fingerprintsChunks ? Fingerprint(rest) : nil))
                pool.release(buf)
                continue
            }
            let w0 = ContinuousClock.now
            try writeChunk(buf)
            lastWrite = ContinuousClock.now - w0
            let chunk = WrittenChunk(offset: buf.offset, count: buf.count, fingerprint: buf.fingerprint)
            pool.release(buf)
            try wrote(chunk, meter: &meter, lastReport: &lastReport)
        }
        try endWriting(meter)
    }

    /// A chunk is on the card: counted, handed to the verifier once synced, reported.
    private func wrote(_ chunk: WrittenChunk, meter: inout PhaseMeter, lastReport: inout ContinuousClock.Instant) throws(ImageIOError) {
        meter.add(UInt64(chunk.count))
        unverified.append(chunk)
        if let verifier, let interval = options.syncInterval,
           unverified.reduce(0, { $0 + UInt64($1.count) }) >= syncInterval(interval, meter: meter) {
            // What is synced may be read back now, while the writer goes on.
            if let failure = verifier.failure { throw failure }
            try sync()
            verifier.submit(unverified)
            unverified = []
        }
        if ContinuousClock.now - lastReport > .milliseconds(200) {
            lastReport = ContinuousClock.now
            progress(withDownload(meter.progress))
        }
    }

    /// Every chunk but the first MiB is written: sync, the first MiB, sync again.
    private func endWriting(_ meter: PhaseMeter) throws(ImageIOError) {
        if options.cancellation.isCancelled { throw cancelledError(after: bytesWrittenSoFar) }
        let s0 = ContinuousClock.now
        // Phases are reported in the order a reader expects (writing 100 %, then syncing):
        // the sync that must precede the first MiB is still part of writing it.
        try sync()
        try writeHeldBack()
        var written = withDownload(meter.finalProgress)
        written.bytesTotal = meter.done
        written.secondsRemaining = 0
        progress(written)
        progress(WriteProgress(phase: .syncing, bytesDone: meter.done, bytesTotal: meter.done, bytesPerSecond: 0, secondsRemaining: nil))
        if target.kind == .regularFile {
            // Like bmaptool: the file ends where the image ends (unmapped tail becomes a hole).
            let end = options.bmap?.imageSize ?? streamEnd
            let blobEnd = options.blobs.map { $0.offset + UInt64($0.bytes.count) }.max() ?? 0
            if ftruncate(target.fd, off_t(max(end, blobEnd))) != 0 {
                throw ImageIOError.device(Errno(rawValue: errno), operation: "truncate", path: target.path, offset: nil)
            }
        }
        try sync()
        syncSeconds = (ContinuousClock.now - s0) / .seconds(1)
    }

    // MARK: - Straight from the page cache (a station's card)

    /// A station's card written from a file this machine holds (the decompressed cache, a raw
    /// image): the bytes go from the file's page cache to the card with splice(2), as page
    /// references, with no reader thread, no chunk buffer and no copy. At 32 cards the
    /// readers' copy of every byte was a sixth of the daemon's CPU and their chunks most of
    /// its memory (issue 18); and without a buffer to pay for, every card writes 4 MiB
    /// chunks, an SD card's erase block, however many there are. Blobs and a first-chunk
    /// inspection (their bytes differ per card), a file target (its holes) and
    /// `PROVISION_SPLICE=off` (benchmarks measure both) take the buffered path.
    var splicesFromSource: Bool {
        options.budget != nil && compareWithSource && sourceFD >= 0 && options.blobs.isEmpty && options.inspectFirstChunk == nil
            && target.kind == .blockDevice && target.direct && !WriteJob.spliceTurnedOff
    }

    private static let spliceTurnedOff = getenv("PROVISION_SPLICE").map { String(cString: $0) == "off" } ?? false
    /// The pipe of a splicing write, while it writes.
    private var splicePipe: SplicePipe?

    private func spliceAll(through pipe: SplicePipe) throws(ImageIOError) {
        splicePipe = pipe
        defer { splicePipe = nil }
        // Whole blocks of the card (a pipe holds whole pages; a card's block is at most one).
        let chunk = pipe.capacity / ioUnit * ioUnit

        let end = options.bmap?.imageSize ?? source.fileSize
        let ranges = options.bmap?.mappedByteRanges ?? [(start: UInt64(0), end: end)]
        var meter = PhaseMeter(phase: .writing, total: options.bmap?.mappedBytes ?? end)
        progress(withDownload(meter.progress))
        var lastReport = ContinuousClock.now
        for (start, end) in ranges {
            var pos = start
            while pos < end {
                if options.cancellation.isCancelled { throw cancelledError(after: bytesWrittenSoFar) }
                // Chunks end at the head's end, so the held-back head is exactly the first MiB.
                let n = Int(min(pos < UInt64(headSize) ? min(UInt64(headSize) - pos, UInt64(chunk)) : UInt64(chunk), end - pos))
                try source.awaitBytes(upTo: pos + UInt64(n))
                if pos < UInt64(headSize) {
                    // Written last (see the type's comment), read again from the source then.
                    heldBack.append(WrittenChunk(offset: pos, count: n, fingerprint: nil))
                    meter.add(UInt64(n))
                } else {
                    try spliceOrWrite(at: pos, count: n)
                    try wrote(WrittenChunk(offset: pos, count: n, fingerprint: nil), meter: &meter, lastReport: &lastReport)
                }
                pos += UInt64(n)
            }
        }
        streamEnd = end
        try endWriting(meter)
    }

    /// Source bytes `offset..<offset+count` onto the card at the same offset: whole blocks
    /// through the pipe, the image's last partial block (if any) by read-modify-write.
    private func spliceOrWrite(at offset: UInt64, count: Int) throws(ImageIOError) {
        guard let pipe = splicePipe else { preconditionFailure("spliceOrWrite outside spliceAll") }
        if let size = target.size, offset + UInt64(count) > size {
            throw ImageIOError(.deviceTooSmall, "card too small: the image continues past byte \(size), the end of \(target.path)", offset: size)
        }
        let body = count / ioUnit * ioUnit
        var done = 0
        if body > 0 { aboutToWrite() }
        while done < body {
            // Into the pipe, then all of it out, every time: the pipe holds whole pages, so a
            // run that does not start on a page fills it short of its capacity, and a second
            // splice into a full pipe would wait for ever. Short or not, what came in ends on
            // a page boundary (or the body's end), a multiple of the card's block from here.
            let at = offset + UInt64(done)
            let inPipe: Int
            switch Syscall.retrying({ provision_splice(sourceFD, Int64(at), pipe.write, -1, UInt(min(pipe.capacity, body - done))) }) {
            case .failure(let e):
                throw ImageIOError(.imageUnreadable, "cannot read \(source.path) at offset \(at): \(e)", offset: at, errno: e)
            case .success(0):
                throw ImageIOError(.imageUnreadable, "\(source.path) ends before byte \(at): it is shorter than the image it holds", offset: at)
            case .success(let k):
                inPipe = k
            }
            var out = 0
            while out < inPipe {
                let at = offset + UInt64(done + out)
                switch Syscall.retrying({ provision_splice(pipe.read, -1, target.fd, Int64(at), UInt(inPipe - out)) }) {
                case .failure(let e): throw target.failure(e, operation: "write", offset: at)
                case .success(0): throw target.failure(.noSpace, operation: "write", offset: at)
                case .success(let k): out += k
                }
            }
            done += inPipe
        }
        bytesWrittenSoFar += UInt64(body)
        guard count > body else { return }
        // Less than a block: its bytes, then `writeBytes` merges them with the card's block.
        let partial = AlignedBuffer(capacity: max(ioUnit, target.alignment), alignment: target.alignment)
        let at = offset + UInt64(body)
        guard case .success(let got) = Syscall.preadFully(sourceFD, partial.bytes, count - body, at), got == count - body else {
            throw ImageIOError(.imageUnreadable, "cannot read \(source.path) again at offset \(at): it is shorter than when it was written, or unreadable", offset: at)
        }
        try writeBytes(UnsafeRawBufferPointer(start: partial.bytes, count: count - body), at: at)
    }

    /// Adds the download's progress, for an image read over HTTP; where the image's size is
    /// unknown (a compressed stream), the download's share done gives the ETA.
    private func withDownload(_ p: WriteProgress) -> WriteProgress {
        guard let (received, total) = source.inputProgress?() else { return p }
        var p = p
        p.bytesDownloaded = received
        p.downloadTotal = total
        if p.secondsRemaining == nil, let total, total > 0, received > 0 {
            let elapsed = p.bytesPerSecond > 0 ? Double(p.bytesDone) / p.bytesPerSecond : 0
            let share = Double(received) / Double(total)
            if elapsed > 0 { p.secondsRemaining = elapsed * (1 - share) / share }
        }
        return p
    }

    /// Near the end, sync and hand over every chunk: what is left unverified when the last
    /// byte is written is what the card must still read back before the job is done (16 MiB:
    /// 0.4 s at 40 MB/s). (Tried: longer intervals on fast disks, where a sync costs a few
    /// ms; the larger tail cost more than the syncs saved.)
    private func syncInterval(_ interval: UInt64, meter: PhaseMeter) -> UInt64 {
        guard let total = meter.total, total > meter.done else { return interval }
        return total - meter.done <= 2 * interval ? UInt64(pool.bufferSize) : interval
    }

    /// The first MiB of the image, held back until the rest is on the card and synced (its
    /// own buffer: the first MiB of a bmap may be many small ranges, and holding ring
    /// buffers for them would starve the reader).
    private lazy var head = AlignedBuffer(capacity: headSize, alignment: target.alignment)
    /// The ranges of `head` that hold image bytes, in the order they came.
    private var heldBack: [WrittenChunk] = []

    private func holdBack(_ bytes: UnsafeRawBufferPointer, at offset: UInt64, fingerprint: Fingerprint?) {
        // A source that can be read again (raw file, the station's cache) is read again at
        // the end: 32 cards would otherwise keep 32 MiB of first MiBs for their whole write.
        if !compareWithSource { (head.bytes + Int(offset)).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count) }
        heldBack.append(WrittenChunk(offset: offset, count: bytes.count,
                                     fingerprint: fingerprint ?? (fingerprintsChunks ? Fingerprint(bytes) : nil)))
    }

    /// Writes the held-back first MiB, after everything else is synced. A re-readable source
    /// is read again here (blobs laid over it as before) into a buffer of the pool — a budget
    /// buffer for a station's card, taken now that the writer holds none.
    private func writeHeldBack() throws(ImageIOError) {
        defer { heldBack = [] }
        guard !heldBack.isEmpty else { return }
        if splicePipe != nil {
            for piece in heldBack {
                try spliceOrWrite(at: piece.offset, count: piece.count)
                unverified.append(piece)
            }
            return
        }
        var borrowed: AlignedBuffer?
        defer { if let borrowed { pool.release(borrowed) } }
        let buffer: AlignedBuffer
        if compareWithSource && pool.bufferSize >= headSize && options.budget != nil {
            guard let b = pool.acquire() else { throw cancelledError(after: bytesWrittenSoFar) }
            borrowed = b
            buffer = b
        } else {
            buffer = head
        }
        for piece in heldBack {
            if compareWithSource {
                // Straight into the buffer (a copy through an array was 1 MiB more per card
                // at its end, when the fast cards of a batch end together), blobs laid over.
                let at = buffer.bytes + Int(piece.offset)
                guard case .success(let n) = Syscall.preadFully(sourceFD, at, piece.count, piece.offset), n == piece.count else {
                    throw ImageIOError(.imageUnreadable, "cannot read \(source.path) again at offset \(piece.offset): it is shorter than when it was written, or unreadable", offset: piece.offset)
                }
                overlayBlobs(on: at, at: piece.offset, count: piece.count)
            }
            try writeBytes(UnsafeRawBufferPointer(start: buffer.bytes + Int(piece.offset), count: piece.count), at: piece.offset)
            unverified.append(piece)
        }
    }

    private func writeChunk(_ buf: AlignedBuffer) throws(ImageIOError) {
        try writeBytes(UnsafeRawBufferPointer(start: buf.bytes, count: buf.count), at: buf.offset)
    }

    /// Writes image bytes at `offset`; `bytes` is aligned for direct I/O.
    private func writeBytes(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(ImageIOError) {
        let count = bytes.count
        let end = offset + UInt64(count)
        if let size = target.size, end > size {
            throw ImageIOError(.deviceTooSmall, "card too small: the image continues past byte \(size), the end of \(target.path)", offset: size)
        }
        guard target.kind == .regularFile else { return try writeRun(bytes, at: offset) }
        // An emptied file target reads zeros where nothing is written: runs of zeros (4 KiB
        // blocks) stay holes, and a 4 GiB image with 1 GiB of data takes 1 GiB of disk.
        let block = max(ioUnit, 4096)
        var runStart: Int?
        var i = 0
        while i < count {
            let n = min(block, count - i)
            if isAllZero(UnsafeRawBufferPointer(rebasing: bytes[i..<(i + n)])) {
                if let s = runStart { try writeRun(UnsafeRawBufferPointer(rebasing: bytes[s..<i]), at: offset + UInt64(s)) }
                runStart = nil
            } else if runStart == nil {
                runStart = i
            }
            i += n
        }
        if let s = runStart { try writeRun(UnsafeRawBufferPointer(rebasing: bytes[s..<count]), at: offset + UInt64(s)) }
        // A run of zeros at the end of what is written is a hole only once the file reaches
        // past it: the verifier reads it back before the file's final length is set.
        if end > fileLength {
            if ftruncate(target.fd, off_t(end)) != 0 {
                throw ImageIOError.device(Errno(rawValue: errno), operation: "extend", path: target.path, offset: end)
            }
            fileLength = end
        }
    }

    /// How long the (emptied) file target is now.
    private var fileLength: UInt64 = 0

    /// Whether a byte went to the target yet (the writing thread's alone).
    private var wroteAny = false

    /// Before every write to the target: tells `onFirstByte` once.
    private func aboutToWrite() {
        guard !wroteAny else { return }
        wroteAny = true
        options.onFirstByte?()
    }

    /// Writes `bytes` at `offset` as they are (whole blocks, and the last one by
    /// read-modify-write when the image ends inside it).
    private func writeRun(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(ImageIOError) {
        let count = bytes.count
        let body = count / ioUnit * ioUnit
        if count > 0 { aboutToWrite() }
        if body > 0, case .failure(let e) = Syscall.pwriteAll(target.fd, bytes.baseAddress!, body, offset) {
            throw target.failure(e, operation: "write", offset: offset)
        }
        let tail = count - body
        if tail > 0 {
            // Read-modify-write the last block: direct I/O writes whole blocks, and the bytes of
            // the card beyond the image's end must stay what they were.
            let block = tailBlock
            let at = offset + UInt64(body)
            memset(block.bytes, 0, ioUnit)
            if case .failure(let e) = Syscall.preadFully(target.fd, block.bytes, ioUnit, at) {
                throw target.failure(e, operation: "read before write", offset: at)
            }
            block.bytes.copyMemory(from: bytes.baseAddress! + body, byteCount: tail)
            if case .failure(let e) = Syscall.pwriteAll(target.fd, block.bytes, ioUnit, at) {
                throw target.failure(e, operation: "write", offset: at)
            }
        }
        bytesWrittenSoFar += UInt64(count)
    }

    /// Compared with memcmp, which is vectorised even in a debug build.
    private static let zeros = [UInt8](repeating: 0, count: 1 << 16)

    private func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var i = 0
        while i < bytes.count {
            let n = min(WriteJob.zeros.count, bytes.count - i)
            let same = WriteJob.zeros.withUnsafeBytes { memcmp(bytes.baseAddress! + i, $0.baseAddress!, n) == 0 }
            if !same { return false }
            i += n
        }
        return true
    }

    private func sync() throws(ImageIOError) {
        if case .failure(let e) = Syscall.fdatasync(target.fd) {
            throw target.failure(e, operation: "sync", offset: nil)
        }
    }

    func cancelledError(after bytes: UInt64) -> ImageIOError {
        ImageIOError(.cancelled, "cancelled after writing \(bytes) bytes to \(target.path): the card is incomplete and will not boot; write it again", offset: bytes)
    }

    /// The bytes that should be at `offset`: read again from the image, used only to name
    /// the first differing byte after a hash mismatch (raw: a pread; compressed: decode up to
    /// there once more — an error path, never the normal one).
    func expectedBytes(offset: UInt64, count: Int) throws(ImageIOError) -> [UInt8] {
        var out: [UInt8]
        if compareWithSource {
            // Raw or cache file: read it at the offset (the page cache usually has it).
            out = [UInt8](repeating: 0, count: count)
            let got = out.withUnsafeMutableBytes { Syscall.preadFully(sourceFD, $0.baseAddress!, count, offset) }
            guard case .success(let n) = got else { throw ImageIOError(.imageUnreadable, "cannot read \(source.path) again at offset \(offset)") }
            out.removeLast(count - n)
        } else {
            let again = try source.reopened()
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 64)
            defer { scratch.deallocate() }
            try again.skip(offset, scratch: scratch)
            let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: max(count, 1), alignment: 64)
            defer { raw.deallocate() }
            let got = try again.read(into: raw.baseAddress!, count: count)
            out = Array(raw.prefix(got))
        }
        for blob in options.blobs {
            let r = (offset..<offset + UInt64(count)).clamped(to: blob.offset..<blob.offset + UInt64(blob.bytes.count))
            for o in r { if Int(o - offset) < out.count { out[Int(o - offset)] = blob.bytes[Int(o - blob.offset)] } else { out.append(blob.bytes[Int(o - blob.offset)]) } }
        }
        return out
    }
}

/// Checks every mapped range of the source against the bmap's checksum as it streams by
/// (bytes arrive in offset order; bytes outside every mapped range are ignored). A mismatch
/// means the image (or its bmap) is damaged — not the card.
struct BmapRangeChecker {
    let bmap: Bmap
    private let extents: [(start: UInt64, end: UInt64)]
    private var index = 0
    private var sha256 = SHA256()
    private var sha1 = Insecure.SHA1()

    init(bmap: Bmap) {
        self.bmap = bmap
        self.extents = bmap.mappedByteRanges
    }

    mutating func feed(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(ImageIOError) {
        var cursor = 0
        while cursor < bytes.count, index < extents.count {
            let (start, end) = extents[index]
            let here = offset + UInt64(cursor)
            if here >= end { index += 1; continue }
            if here < start {
                cursor += Int(min(start - here, UInt64(bytes.count - cursor)))
                continue
            }
            let n = Int(min(UInt64(bytes.count - cursor), end - here))
            let slice = UnsafeRawBufferPointer(rebasing: bytes[cursor..<(cursor + n)])
            if bmap.checksumType == .sha256 { sha256.update(bufferPointer: slice) } else { sha1.update(bufferPointer: slice) }
            cursor += n
            guard here + UInt64(n) == end else { continue }
            let digest = bmap.checksumType == .sha256 ? sha256.finalize().hex : sha1.finalize().hex
            sha256 = SHA256()
            sha1 = Insecure.SHA1()
            let range = bmap.ranges[index]
            index += 1
            if let expected = range.checksum, expected != digest {
                throw ImageIOError(.imageCorrupt, "image corrupt: blocks \(range.first)–\(range.last) of the image do not match the bmap's \(bmap.checksumType.rawValue) (the image is damaged, or the bmap \(bmap.path) belongs to another image)", offset: start)
            }
        }
    }
}

/// What says a file changed: its inode, size, and modification and change times.
struct FileStamp: Equatable {
    let inode: UInt64
    let size: Int64
    let modified: timespec
    let changed: timespec

    init?(fd: Int32) {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        inode = UInt64(st.st_ino)
        size = Int64(st.st_size)
        modified = st.st_mtim
        changed = st.st_ctim
    }

    static func == (a: FileStamp, b: FileStamp) -> Bool {
        a.inode == b.inode && a.size == b.size
            && a.modified.tv_sec == b.modified.tv_sec && a.modified.tv_nsec == b.modified.tv_nsec
            && a.changed.tv_sec == b.changed.tv_sec && a.changed.tv_nsec == b.changed.tv_nsec
    }
}
