import Foundation
@testable import ImageIO
import Testing
import TestSupport

/// Compressed images are read ahead on a thread of their own, around the page cache where
/// the file system allows it (ext4 under /tmp here) and through it where it does not (tmpfs).
@Suite("Compressed input read ahead")
struct ReadAheadTests {
    /// 5 MiB and a bit of incompressible bytes: the compressed file is longer than the
    /// read-ahead's four 1 MiB buffers and does not end on a block boundary.
    static let imageSize = (5 << 20) + 1234

    func decodeAll(_ path: String) throws -> (bytes: [UInt8], direct: Bool?) {
        let source = try ImageSource(path: path)
        var out = [UInt8](repeating: 0, count: ReadAheadTests.imageSize + 4096)
        var filled = 0
        while true {
            let n = try out.withUnsafeMutableBytes { try source.read(into: $0.baseAddress! + filled, count: min(300_000, $0.count - filled)) }
            if n == 0 { break }
            filled += n
        }
        return (Array(out.prefix(filled)), source.readsCompressedInputDirectly)
    }

    func compressed(_ format: String, in dir: TemporaryDirectory) throws -> (original: [UInt8], path: String) {
        let original = patternBytes(ReadAheadTests.imageSize)
        return (original, try ImageIOTests.compress(try dir.write("image.raw", original), format))
    }

    @Test("on ext4 the compressed file is read with O_DIRECT: decoded byte-exact, and fincore finds it kept out of the page cache", arguments: ["gz", "xz", "zst"])
    func directOnExt4(format: String) throws {
        let dir = try TemporaryDirectory("provision-readahead")
        #expect(try run("findmnt", "-T", dir.path, "-no", "FSTYPE").trimmingCharacters(in: .whitespacesAndNewlines) == "ext4")
        let (original, path) = try compressed(format, in: dir)
        // Evict the file, as a page cache without it would be: what is cached afterwards was
        // put there by the read.
        try run("sync", path)
        let fd = open(path, O_RDONLY)
        #expect(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0)
        close(fd)
        #expect(try residentPages(path) == 0, "the test could not evict \(path) from the page cache")

        let (decoded, direct) = try decodeAll(path)
        #expect(direct == true)
        #expect(decoded == original)
        // A buffered read would leave all ~1280 pages cached. The few allowed are the probes of
        // the header (magic bytes, zstd frame size) and of the xz index at the end.
        let resident = try residentPages(path)
        #expect(resident <= 16, "reading \(path) left \(resident) pages in the page cache")
    }

    @Test("on ramfs, which refuses O_DIRECT, it is read through the page cache and decoded byte-exact", arguments: ["gz", "xz", "zst"])
    func bufferedOnRamfs(format: String) throws {
        // ramfs, not tmpfs: tmpfs accepts O_DIRECT since Linux 6.6.
        let dir = try TemporaryDirectory("provision-ramfs")
        try run("mount", "-t", "ramfs", "-o", "size=32m", "ramfs", dir.path)
        defer { _ = try? run("umount", dir.path) }
        let (original, path) = try compressed(format, in: dir)
        #expect(open(path, O_RDONLY | Syscall.oDirect) == -1 && errno == EINVAL, "ramfs accepted O_DIRECT: this test proves nothing here")
        let (decoded, direct) = try decodeAll(path)
        #expect(direct == false)
        #expect(decoded == original)
    }

    @Test("a source opened only for its size starts no read-ahead")
    func sizeHintStartsNothing() throws {
        let dir = try TemporaryDirectory("provision-readahead")
        let (original, path) = try compressed("zst", in: dir)
        let source = try ImageSource(path: path)
        #expect(source.uncompressedSizeHint == UInt64(original.count))
        #expect(source.readsCompressedInputDirectly == nil)
    }

    @Test("a source dropped halfway stops its read-ahead and closes the file")
    func droppedSourceStopsReading() throws {
        let dir = try TemporaryDirectory("provision-readahead")
        let (_, path) = try compressed("zst", in: dir)
        do {
            let source = try ImageSource(path: path)
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 64)
            defer { buffer.deallocate() }
            #expect(try source.read(into: buffer, count: 1 << 20) == 1 << 20)
            #expect(try openDescriptors(of: path) == 2, "the source's and the read-ahead's")
        }
        // The read-ahead's deinit waits for its thread before closing its descriptor.
        #expect(try openDescriptors(of: path) == 0)
    }

    func openDescriptors(of path: String) throws -> Int {
        try FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").filter {
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + $0)) == path
        }.count
    }

    /// Pages of `path` in the page cache, as util-linux's fincore counts them.
    func residentPages(_ path: String) throws -> Int {
        let out = try run("fincore", "--noheadings", "--raw", "--output", "PAGES", path)
        guard let pages = Int(out.trimmingCharacters(in: .whitespacesAndNewlines)) else { throw FixtureError("fincore said \(out)") }
        return pages
    }
}
