#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ProvisionCShims
import SystemPackage

/// Reads a compressed image from start to end on a thread of its own, a few buffers ahead of
/// the decompressor, so the decompressor never waits for the disk and never pays for a copy.
///
/// Where the file system allows it the file is read with O_DIRECT: the disk's DMA fills these
/// buffers, and the page cache, which a one-pass read of a large image only churns, is left
/// alone. Measured on a 430 MB .zst: copying it out of the page cache cost the decompressing
/// thread 0.15–0.45 s of the 1 s it had, on a 2-core station where decompression, the bmap
/// check and verification compete for both cores. Where O_DIRECT is refused (ramfs, tmpfs
/// before Linux 6.6, some network file systems) or a short read leaves the next offset
/// unaligned, it reads through the page cache instead; the thread still overlaps the reads
/// with decompression.
final class ReadAhead: @unchecked Sendable {
    /// 4 × 1 MiB: enough to keep one read in flight while the decompressor eats the others,
    /// small enough for the 64 MiB budget of a whole write.
    static let bufferSize = 1 << 20
    static let bufferCount = 4

    private let path: String
    private let fd: Int32
    /// Whether the file was opened for direct reads (the thread may still fall back).
    let opensDirect: Bool
    private let pool = BufferPool(count: ReadAhead.bufferCount, bufferSize: ReadAhead.bufferSize, alignment: 4096)
    private let filled = ChunkQueue()
    private let finished = DispatchSemaphore(value: 0)
    /// The buffer the consumer is reading from, and how far.
    private var current: AlignedBuffer?
    private var consumed = 0

    /// Starts reading `path` from its first byte.
    init(path: String) throws(Errno) {
        self.path = path
        // A descriptor of its own: O_DIRECT is a property of the open file description.
        let direct = try? Syscall.open(path, flags: O_RDONLY | Syscall.oDirect).get()
        if let direct { fd = direct } else { fd = try Syscall.open(path, flags: O_RDONLY).get() }
        self.opensDirect = direct != nil
        // The thread holds the parts it needs, not `self`: dropping the last reference to the
        // read-ahead is what stops it (deinit closes the pool the thread waits on).
        let (fd, pool, filled, finished) = (fd, pool, filled, finished)
        let thread = Thread {
            provision_name_thread("prov-read-ahead")
            defer { finished.signal() }
            ReadAhead.run(path: path, fd: fd, pool: pool, filled: filled)
        }
        thread.start()
    }

    deinit {
        pool.close()
        if let current { pool.release(current) }
        finished.wait()
        Syscall.close(fd)
    }

    /// The bytes not yet consumed: empty at the end of the file. Throws a read error when the
    /// reader met one at this point of the file.
    func available() throws -> UnsafeRawBufferPointer {
        while true {
            if let current, consumed < current.count {
                return UnsafeRawBufferPointer(start: current.bytes + consumed, count: current.count - consumed)
            }
            if let current { pool.release(current) }
            current = nil
            consumed = 0
            guard let next = try filled.take() else { return UnsafeRawBufferPointer(start: nil, count: 0) }
            current = next
        }
    }

    func consume(_ count: Int) { consumed += count }

    private static func run(path: String, fd: Int32, pool: BufferPool, filled: ChunkQueue) {
        var offset: UInt64 = 0
        var direct = fcntl(fd, F_GETFL) & Syscall.oDirect != 0
        while let buffer = pool.acquire() {
            // Direct reads must start on a block boundary; after a short read in mid-file the
            // next one may not.
            if direct && offset % 4096 != 0 { direct = useBufferedReads(fd) }
            var result = Syscall.pread(fd, buffer.bytes, ReadAhead.bufferSize, offset)
            if case .failure(.invalidArgument) = result, direct {
                direct = useBufferedReads(fd)
                result = Syscall.pread(fd, buffer.bytes, ReadAhead.bufferSize, offset)
            }
            switch result {
            case .failure(let e):
                pool.release(buffer)
                filled.finish(error: ImageIOError(.imageUnreadable, "cannot read image \(path) at offset \(offset): \(e)", offset: offset, errno: e))
                return
            case .success(0):
                pool.release(buffer)
                filled.finish()
                return
            case .success(let n):
                buffer.offset = offset
                buffer.count = n
                offset += UInt64(n)
                filled.put(buffer)
            }
        }
        filled.finish()
    }

    /// Drops O_DIRECT for the rest of the file; returns false (the new state of `direct`).
    private static func useBufferedReads(_ fd: Int32) -> Bool {
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~Syscall.oDirect)
        return false
    }
}
