#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ProvisionCShims

/// Reads back written ranges with O_DIRECT (never the page cache: the target fd is direct) and
/// compares each with the source: byte for byte with a raw (or cached) image, by the
/// fingerprint taken from the stream for a compressed one. Only ranges the writer has
/// synced are submitted, so what is read is what the card holds. Runs on its own thread, so
/// that it can overlap the writing of later ranges.
final class BackgroundVerifier: @unchecked Sendable {
    private let job: WriteJob
    private let condition = NSCondition()
    private var queue: [WrittenChunk] = []
    private var closed = false
    private var stopped = false
    private var error: ImageIOError?
    private var verified: UInt64 = 0
    private var submitted: UInt64 = 0
    /// First differing byte of each chunk that read back wrong once and right after it was
    /// written again (issue 16: one repair attempt).
    private var repaired: [UInt64] = []
    private let done = DispatchSemaphore(value: 0)

    init(job: WriteJob) {
        self.job = job
        let thread = Thread { [self] in
            provision_name_thread("prov-verify")
            run()
        }
        thread.start()
    }

    /// Read-back pieces, when the verifier compares with the source: a chunk is read back
    /// in pieces of at most this, each compared (and repaired) on its own, so that a card's
    /// read-back holds a quarter of a 1 MiB chunk (issue 18: 32 cards' read-backs were a
    /// third of the station's buffers). At a card's read speed (tens of MB/s) a 256 KiB read
    /// takes milliseconds, against microseconds of system-call overhead.
    static let piece = ImageWriter.readBackPiece

    /// The read-back buffer's size: pieces on a station's budget; a whole chunk where its
    /// fingerprint must be taken in one piece, and for `provision write`, whose one card has
    /// its own buffers (on a fast disk, larger reads are faster).
    var pieceSize: Int {
        job.compareWithSource && job.options.budget != nil ? min(job.pool.bufferSize, Self.piece) : job.pool.bufferSize
    }

    func submit(_ chunks: [WrittenChunk]) {
        let size = pieceSize
        let chunks = chunks.flatMap { chunk in
            guard chunk.count > size else { return [chunk] }
            return stride(from: 0, to: chunk.count, by: size).map {
                WrittenChunk(offset: chunk.offset + UInt64($0), count: min(size, chunk.count - $0), fingerprint: nil)
            }
        }
        condition.lock()
        queue.append(contentsOf: chunks)
        submitted += chunks.reduce(0) { $0 + UInt64($1.count) }
        condition.signal()
        condition.unlock()
    }

    var failure: ImageIOError? { condition.withLock { error } }
    var repairs: [UInt64] { condition.withLock { repaired } }

    /// No more chunks: waits until all are verified, reporting progress, and throws the first
    /// mismatch or read error.
    func finish(reportingTo progress: @Sendable (WriteProgress) -> Void) throws(ImageIOError) {
        condition.lock()
        closed = true
        condition.signal()
        let total = submitted
        condition.unlock()
        let start = ContinuousClock.now
        let alreadyVerified = condition.withLock { verified }
        while done.wait(timeout: .now() + .milliseconds(200)) == .timedOut {
            let now = condition.withLock { verified }
            let elapsed = (ContinuousClock.now - start) / .seconds(1)
            let rate = elapsed > 0.05 ? Double(now - alreadyVerified) / elapsed : 0
            progress(WriteProgress(phase: .verifying, bytesDone: now, bytesTotal: total, bytesPerSecond: rate,
                                   secondsRemaining: rate > 0 ? Double(total - now) / rate : nil))
        }
        done.signal()  // leave it signalled for stop()
        if let error = failure { throw error }
        if job.options.cancellation.isCancelled { throw job.cancelledError(after: job.bytesWrittenSoFar) }
        progress(WriteProgress(phase: .verifying, bytesDone: total, bytesTotal: total, bytesPerSecond: 0, secondsRemaining: 0))
    }

    /// Ends the thread (early when the write failed) and waits for it: it must not read the
    /// target's descriptor after the caller closes it.
    func stop() {
        condition.lock()
        stopped = true
        condition.signal()
        condition.unlock()
        done.wait()
        done.signal()
    }

    /// For whole chunks two threads: this one reads chunk N+1 from the card while a hasher
    /// checks chunk N, so on a fast target hashing does not add to the read time. A station's
    /// pieces are compared on this one (see `inline`).
    private func run() {
        defer { done.signal() }
        let target = job.target
        let unit = job.ioUnit
        // On a station's budget, one buffer: the read-back of a chunk takes the card tens of
        // milliseconds, its comparison a fraction of one, so a second buffer would only be held.
        let pool = job.options.budget.map { BufferPool(budget: $0, maximum: 1, bufferSize: pieceSize, alignment: target.alignment,
                                                             cancellation: job.options.cancellation) }
            ?? BufferPool(count: 2, bufferSize: pieceSize, alignment: target.alignment)
        /// Compares one read-back buffer and gives it back; false when the job must stop.
        @Sendable func check(_ buffer: AlignedBuffer, keep: Bool = false) -> Bool {
            let same = job.compareWithSource ? matchesSource(buffer) : Fingerprint(buffer.buffer) == buffer.fingerprint
            if !same {
                // A raw image rebuilt in place differs from what went to the card: an image
                // error, never a repair with the new bytes or a verdict on the card.
                let outcome = job.sourceChangedError().map { Result<UInt64, ImageIOError>.failure($0) }
                    ?? (job.options.repair ? repair(buffer) : .failure(mismatch(buffer)))
                switch outcome {
                case .success(let at):
                    condition.withLock { repaired.append(at) }
                case .failure(let failure):
                    condition.withLock { error = failure }
                    pool.close()
                    return false
                }
            }
            if !keep { pool.release(buffer) }
            condition.withLock { verified += UInt64(buffer.count) }
            return true
        }
        // Pieces (a station's card, compared with the cache) are compared right here: a piece's
        // comparison takes tens of microseconds against its read's milliseconds, and handing it
        // to another thread would cost two wake-ups a piece and a thread a card. Whole chunks
        // are fingerprinted on a thread of their own.
        let inline = job.compareWithSource && job.options.budget != nil
        let filled = ChunkQueue()
        // (Created at 0 and signalled: a semaphore freed below its initial value traps.)
        let hasherDone = DispatchSemaphore(value: 0)
        if inline {
            hasherDone.signal()
        } else {
            let hasher = Thread {
                provision_name_thread("prov-compare")
                defer { hasherDone.signal() }
                // Each buffer arrives holding the chunk's offset, length and fingerprint.
                while let buffer = try? filled.take() {
                    if !check(buffer) { return }
                }
            }
            hasher.start()
        }
        defer { filled.finish(); pool.close(); hasherDone.wait() }
        // Compared here, a piece's buffer is kept for the next piece while pieces are queued,
        // and given back to the budget only when the queue runs dry (one take per sync
        // interval, not one per piece).
        var kept: AlignedBuffer?
        defer { if let kept { pool.release(kept) } }
        while true {
            condition.lock()
            if queue.isEmpty && !closed && !stopped, let buffer = kept {
                condition.unlock()
                pool.release(buffer)
                kept = nil
                condition.lock()
            }
            while queue.isEmpty && !closed && !stopped { condition.wait() }
            if stopped || (queue.isEmpty && closed) || error != nil { condition.unlock(); return }
            let chunk = queue.removeFirst()
            condition.unlock()
            if job.options.cancellation.isCancelled { return }
            guard let buffer = kept ?? pool.acquire() else { return }
            kept = nil
            let length = (chunk.count + unit - 1) / unit * unit
            switch Syscall.preadFully(target.fd, buffer.bytes, length, chunk.offset) {
            case .failure(let e):
                pool.release(buffer)
                condition.withLock { error = target.failure(e, operation: "read-back", offset: chunk.offset) }
                return
            case .success(let n) where n < chunk.count:
                pool.release(buffer)
                condition.withLock { error = shortRead(chunk, got: n) }
                return
            case .success:
                buffer.offset = chunk.offset
                buffer.count = chunk.count
                buffer.fingerprint = chunk.fingerprint
            }
            if !inline {
                filled.put(buffer)
            } else {
                guard check(buffer, keep: true) else { return }
                kept = buffer
            }
        }
    }

    /// Compares the read-back bytes with the source file at the same offset, a slice at a
    /// time through one reused 64 KiB buffer (the page cache usually holds the source; a
    /// chunk-sized buffer per card was 32 MiB outside the budget for 32 cards, and a slice
    /// below glibc's mmap threshold comes from the thread's arena); blobs overlay their bytes.
    /// (Tried: a station's 256 KiB piece in one read, a quarter of the system calls; at 32
    /// cards the daemon's CPU did not move beyond run-to-run noise, and each card held 192 KiB
    /// more.)
    private static let sliceSize = 64 << 10
    private var sourceScratch: UnsafeMutableRawBufferPointer?
    private var sourceBuffer: UnsafeMutableRawBufferPointer {
        if let b = sourceScratch { return b }
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.sliceSize, alignment: 64)
        sourceScratch = b
        return b
    }

    deinit { sourceScratch?.deallocate() }

    private func matchesSource(_ buffer: AlignedBuffer) -> Bool {
        let range = buffer.offset..<(buffer.offset + UInt64(buffer.count))
        if job.options.blobs.contains(where: { !range.clamped(to: $0.offset..<($0.offset + UInt64($0.bytes.count))).isEmpty }) {
            guard let expected = try? job.expectedBytes(offset: buffer.offset, count: buffer.count), expected.count == buffer.count else { return false }
            return expected.withUnsafeBytes { memcmp($0.baseAddress!, buffer.bytes, buffer.count) == 0 }
        }
        var done = 0
        while done < buffer.count {
            let n = min(sourceBuffer.count, buffer.count - done)
            guard case .success(let got) = Syscall.preadFully(job.sourceFD, sourceBuffer.baseAddress!, n, buffer.offset + UInt64(done)), got == n,
                  memcmp(sourceBuffer.baseAddress!, buffer.bytes + done, n) == 0 else { return false }
            done += n
        }
        return true
    }

    /// The read-back `buffer` differs from the image: one repair attempt. The chunk is
    /// written again (the image's bytes; whatever the card returned past the image's end
    /// in its last block goes back as it was), flushed, and read back once more. A card
    /// that now returns the image is repaired at the first byte that differed; one that
    /// differs again is failing. Runs on the hasher thread while the writer may still be
    /// writing later chunks: other offsets of the same descriptor.
    private func repair(_ buffer: AlignedBuffer) -> Result<UInt64, ImageIOError> {
        let target = job.target
        let expected: [UInt8]
        do throws(ImageIOError) { expected = try job.expectedBytes(offset: buffer.offset, count: buffer.count) } catch { return .failure(error) }
        guard expected.count == buffer.count else { return .failure(mismatch(buffer)) }
        let first = firstDifference(buffer, expected) ?? buffer.offset
        let length = (buffer.count + job.ioUnit - 1) / job.ioUnit * job.ioUnit
        expected.withUnsafeBytes { buffer.bytes.copyMemory(from: $0.baseAddress!, byteCount: buffer.count) }
        if case .failure(let e) = Syscall.pwriteAll(target.fd, buffer.bytes, length, buffer.offset) {
            return .failure(target.failure(e, operation: "repair write", offset: buffer.offset))
        }
        if case .failure(let e) = Syscall.fdatasync(target.fd) {
            return .failure(target.failure(e, operation: "repair sync", offset: buffer.offset))
        }
        switch Syscall.preadFully(target.fd, buffer.bytes, length, buffer.offset) {
        case .failure(let e): return .failure(target.failure(e, operation: "repair read-back", offset: buffer.offset))
        case .success(let n) where n < buffer.count:
            return .failure(shortRead(WrittenChunk(offset: buffer.offset, count: buffer.count, fingerprint: nil), got: n))
        case .success: break
        }
        guard let again = firstDifference(buffer, expected) else { return .success(first) }
        return .failure(ImageIOError(.verifyMismatch, "card returned other data twice at byte \(again): failing card (\(target.path); do not use it)", offset: again))
    }

    private func firstDifference(_ buffer: AlignedBuffer, _ expected: [UInt8]) -> UInt64? {
        let actual = UnsafeRawBufferPointer(start: buffer.bytes, count: min(buffer.count, expected.count))
        for i in 0..<actual.count where actual[i] != expected[i] { return buffer.offset + UInt64(i) }
        return nil
    }

    /// The read-back `buffer` differs from the image: finds the first differing byte.
    private func mismatch(_ buffer: AlignedBuffer) -> ImageIOError {
        let actual = Array(buffer.buffer)
        let expected: [UInt8]
        do throws(ImageIOError) { expected = try job.expectedBytes(offset: buffer.offset, count: buffer.count) } catch { return error }
        var first = buffer.offset + UInt64(min(actual.count, expected.count))
        for i in 0..<min(actual.count, expected.count) where actual[i] != expected[i] {
            first = buffer.offset + UInt64(i)
            break
        }
        return ImageIOError(.verifyMismatch, "verification failed: \(job.target.path) differs from the image at byte offset \(first) (0x\(String(first, radix: 16))); the card is faulty or was altered — do not use it", offset: first)
    }

    private func shortRead(_ chunk: WrittenChunk, got: Int) -> ImageIOError {
        let offset = chunk.offset + UInt64(got)
        let removed = job.target.failure(.noSpace, operation: "read-back", offset: offset)
        if removed.code == .deviceRemoved { return removed }
        return ImageIOError(.ioError, "read-back of \(job.target.path) ended early at byte offset \(offset): the card is shorter than what was written to it", offset: offset)
    }
}
