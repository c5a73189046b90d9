import Foundation
import ImageIO
@testable import Station
import Testing
import TestSupport

/// A cache entry whose fill failed is replaced by a new one for the next job, while the jobs
/// that read the failed one may still hold it: each job lets go of its own entry.
@Suite("image cache: a failed entry and its replacement")
struct ImageCacheReplacementTests {
    @Test("a job still holding a failed entry lets go of that entry, not of the one made to try again; both files go with their last job")
    func eachJobReleasesItsOwnEntry() async throws {
        let dir = try TemporaryDirectory("provision-cache-replace")
        defer { dir.remove() }
        try await offPool {
            // Two gzip members: the header declares the first, so every fill of it fails.
            let part = dir.file("part")
            try Command.check(["sh", "-c", "head -c 262144 /dev/urandom > '\(part)'"])
            let image = dir.file("joined.img.gz")
            try Command.check(["sh", "-c", "gzip -c '\(part)' > '\(image)' && gzip -c '\(part)' >> '\(image)'"])
            let store = try ImageCacheStore(directory: dir.file("cache"), limit: 1 << 30)

            let first = try store.source(for: image, bmap: nil)
            #expect(throws: ImageIOError.self) { try Self.readToEnd(first.source) }
            // The next job finds the entry failed and gets one of its own.
            let second = try store.source(for: image, bmap: nil)
            #expect(second.cacheKey != first.cacheKey)
            #expect(throws: ImageIOError.self) { try Self.readToEnd(second.source) }
            #expect(Self.cacheFiles(dir).count == 2)

            store.release(first.cacheKey)
            // The second job still reads its entry: it stays, with its file.
            #expect(store.entryCount == 1)
            #expect(Self.cacheFiles(dir).count == 1)
            store.release(second.cacheKey)
            #expect(store.entryCount == 0)
            #expect(Self.cacheFiles(dir).isEmpty)
        }
    }

    static func readToEnd(_ source: ImageSource) throws {
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        while try buffer.withUnsafeMutableBytes({ try source.read(into: $0.baseAddress!, count: $0.count) }) > 0 {}
    }

    static func cacheFiles(_ dir: TemporaryDirectory) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir.file("cache"))) ?? []).filter { $0.hasSuffix(".img") }
    }
}
