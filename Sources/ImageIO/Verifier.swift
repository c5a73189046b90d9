#if canImport(Glibc)
import Glibc
#endif
import Crypto
import Foundation

/// Reads back exactly the written ranges with O_DIRECT (never the page cache: the target fd
/// is direct) after the final sync, and compares each with the hash taken from the source
/// stream. A reader thread keeps the device busy while this thread hashes.
struct Verifier {
    let job: WriteJob
    let chunks: [WrittenChunk]

    func run() throws(ImageIOError) {
        let target = job.target
        let total = chunks.reduce(UInt64(0)) { $0 + UInt64($1.count) }
        var meter = PhaseMeter(phase: .verifying, total: total)
        job.progress(meter.progress)
        let ordered = chunks.sorted { $0.offset < $1.offset }
        let unit = job.ioUnit
        let filled = ChunkQueue()
        let pool = job.pool
        let stop = CancellationFlag()
        let done = DispatchSemaphore(value: 0)

        let reader = Thread {
            defer { done.signal() }
            for chunk in ordered {
                if stop.isCancelled || job.options.cancellation.isCancelled { break }
                guard let buf = pool.acquire() else { break }
                let length = (chunk.count + unit - 1) / unit * unit
                switch Syscall.preadFully(target.fd, buf.bytes, length, chunk.offset) {
                case .failure(let e):
                    pool.release(buf)
                    filled.finish(error: target.failure(e, operation: "read-back", offset: chunk.offset))
                    return
                case .success(let n):
                    buf.offset = chunk.offset
                    buf.count = min(n, chunk.count)
                    filled.put(buf)
                }
            }
            filled.finish()
        }
        reader.name = "provision-verify"
        reader.start()
        defer { stop.cancel(); pool.close(); done.wait() }

        var lastReport = ContinuousClock.now
        for chunk in ordered {
            let next: AlignedBuffer?
            do { next = try filled.take() } catch let e as ImageIOError { throw e } catch { throw ImageIOError(.ioError, "\(error)") }
            guard let buf = next else {
                if job.options.cancellation.isCancelled { throw job.cancelledError(after: job.bytesWrittenSoFar) }
                throw ImageIOError(.ioError, "read-back of \(target.path) ended early at offset \(chunk.offset)", offset: chunk.offset)
            }
            let digest = Array(SHA256.hash(data: buf.buffer))
            if buf.count != chunk.count || digest != chunk.sha256 {
                let actual = Array(buf.buffer)
                pool.release(buf)
                throw try mismatch(chunk: chunk, actual: actual)
            }
            pool.release(buf)
            meter.add(UInt64(chunk.count))
            if ContinuousClock.now - lastReport > .milliseconds(200) {
                lastReport = ContinuousClock.now
                job.progress(meter.progress)
            }
        }
        job.progress(meter.progress)
    }

    private func mismatch(chunk: WrittenChunk, actual: [UInt8]) throws(ImageIOError) -> ImageIOError {
        let expected = try job.expectedBytes(offset: chunk.offset, count: chunk.count)
        var first = chunk.offset + UInt64(min(actual.count, expected.count))
        for i in 0..<min(actual.count, expected.count) where actual[i] != expected[i] {
            first = chunk.offset + UInt64(i)
            break
        }
        return ImageIOError(.verifyMismatch, "verification failed: \(job.target.path) differs from the image at byte offset \(first) (0x\(String(first, radix: 16))); the card is faulty or was altered — do not use it", offset: first)
    }
}
