#if canImport(Glibc)
import Glibc
#endif
import Crypto
import Foundation

/// Reads back written ranges with O_DIRECT (never the page cache: the target fd is direct) and
/// compares each with the hash taken from the source stream. Only ranges the writer has
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
    private let done = DispatchSemaphore(value: 0)
    /// Chunks read and waiting for the hasher, in order.
    private let pending = LockedQueue()

    init(job: WriteJob) {
        self.job = job
        let thread = Thread { [self] in run() }
        thread.name = "provision-verify"
        thread.start()
    }

    func submit(_ chunks: [WrittenChunk]) {
        condition.lock()
        queue.append(contentsOf: chunks)
        submitted += chunks.reduce(0) { $0 + UInt64($1.count) }
        condition.signal()
        condition.unlock()
    }

    var failure: ImageIOError? { condition.withLock { error } }

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

    /// Two threads: this one reads chunk N+1 from the card while a hasher checks chunk N, so
    /// on a fast target hashing does not add to the read time.
    private func run() {
        defer { done.signal() }
        let target = job.target
        let unit = job.ioUnit
        let pool = BufferPool(count: 2, bufferSize: job.pool.bufferSize, alignment: target.alignment)
        let filled = ChunkQueue()
        let hasherDone = DispatchSemaphore(value: 0)
        let hasher = Thread { [self] in
            defer { hasherDone.signal() }
            while let next = try? filled.take() {
                let (buffer, chunk) = (next, pending.withLock { $0.removeFirst() })
                var failure: ImageIOError?
                if buffer.count != chunk.count {
                    failure = shortRead(chunk: chunk, got: buffer.count)
                } else if job.compareWithSource {
                    if !matchesSource(buffer, chunk: chunk) { failure = mismatch(chunk: chunk, actual: Array(buffer.buffer)) }
                } else if Fingerprint(buffer.buffer) != chunk.fingerprint {
                    failure = mismatch(chunk: chunk, actual: Array(buffer.buffer))
                }
                if let failure {
                    condition.withLock { error = failure }
                    pool.close()
                    return
                }
                pool.release(buffer)
                condition.withLock { verified += UInt64(chunk.count) }
            }
        }
        hasher.name = "provision-verify-hash"
        hasher.start()
        defer { filled.finish(); pool.close(); hasherDone.wait() }
        while true {
            condition.lock()
            while queue.isEmpty && !closed && !stopped { condition.wait() }
            if stopped || (queue.isEmpty && closed) || error != nil { condition.unlock(); return }
            let chunk = queue.removeFirst()
            condition.unlock()
            if job.options.cancellation.isCancelled { return }
            guard let buffer = pool.acquire() else { return }
            let length = (chunk.count + unit - 1) / unit * unit
            switch Syscall.preadFully(target.fd, buffer.bytes, length, chunk.offset) {
            case .failure(let e):
                pool.release(buffer)
                condition.withLock { error = target.failure(e, operation: "read-back", offset: chunk.offset) }
                return
            case .success(let n):
                buffer.count = min(n, chunk.count)
            }
            pending.withLock { $0.append(chunk) }
            filled.put(buffer)
        }
    }

    /// Compares the read-back bytes with the source file at the same offset, through one
    /// reused buffer (the page cache usually holds the source); blobs overlay their bytes.
    private var sourceScratch: UnsafeMutableRawBufferPointer?
    private var sourceBuffer: UnsafeMutableRawBufferPointer {
        if let b = sourceScratch { return b }
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: job.pool.bufferSize, alignment: 64)
        sourceScratch = b
        return b
    }

    deinit { sourceScratch?.deallocate() }

    private func matchesSource(_ buffer: AlignedBuffer, chunk: WrittenChunk) -> Bool {
        let range = chunk.offset..<(chunk.offset + UInt64(chunk.count))
        if job.options.blobs.contains(where: { !range.clamped(to: $0.offset..<($0.offset + UInt64($0.bytes.count))).isEmpty }) {
            guard let expected = try? job.expectedBytes(offset: chunk.offset, count: chunk.count), expected.count == buffer.count else { return false }
            return expected.withUnsafeBytes { memcmp($0.baseAddress!, buffer.bytes, buffer.count) == 0 }
        }
        guard case .success(let n) = Syscall.preadFully(job.sourceFD, sourceBuffer.baseAddress!, chunk.count, chunk.offset), n == buffer.count else { return false }
        return memcmp(sourceBuffer.baseAddress!, buffer.bytes, n) == 0
    }

    private func mismatch(chunk: WrittenChunk, actual: [UInt8]) -> ImageIOError {
        let expected: [UInt8]
        do throws(ImageIOError) { expected = try job.expectedBytes(offset: chunk.offset, count: chunk.count) } catch { return error }
        var first = chunk.offset + UInt64(min(actual.count, expected.count))
        for i in 0..<min(actual.count, expected.count) where actual[i] != expected[i] {
            first = chunk.offset + UInt64(i)
            break
        }
        return differsError(at: first)
    }

    private func differsError(at offset: UInt64) -> ImageIOError {
        ImageIOError(.verifyMismatch, "verification failed: \(job.target.path) differs from the image at byte offset \(offset) (0x\(String(offset, radix: 16))); the card is faulty or was altered — do not use it", offset: offset)
    }

    private func shortRead(chunk: WrittenChunk, got: Int) -> ImageIOError {
        let offset = chunk.offset + UInt64(got)
        let removed = job.target.failure(.noSpace, operation: "read-back", offset: offset)
        if removed.code == .deviceRemoved { return removed }
        return ImageIOError(.ioError, "read-back of \(job.target.path) ended early at byte offset \(offset): the card is shorter than what was written to it", offset: offset)
    }
}

/// A tiny locked FIFO of chunk records shared by the verifier's two threads.
final class LockedQueue: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [WrittenChunk] = []
    func withLock<T>(_ body: (inout [WrittenChunk]) -> T) -> T { lock.withLock { body(&items) } }
}
