import Foundation
@testable import ImageIO
import Testing
import TestSupport

/// The station's cache fill (one decoder thread, every format but block-parallel .xz) reads
/// the compressed stream to its end: the container's checksum sits there, and a file holding
/// more than its header declares must not become a cache, and cards, cut short. Checked
/// against zstd(1) and gzip(1): what they say of each file is the premise.
@Suite("the image cache reads a compressed stream to its end")
struct CacheFillStreamEndTests {
    /// 128 KiB of random bytes, 256 KiB of zeros (RLE blocks in zstd), 128 KiB random.
    static func image(in dir: TemporaryDirectory, name: String = "image") throws -> String {
        let path = dir.file(name)
        try run("sh", "-c", "{ head -c 131072 /dev/urandom; head -c 262144 /dev/zero; head -c 131072 /dev/urandom; } > '\(path)'")
        return path
    }

    static func fill(_ path: String, into dir: TemporaryDirectory) async throws -> ParallelXZFillTests.Outcome {
        let size = try #require(try ImageSource(path: path).uncompressedSizeHint, "the container declares its size")
        return try await ParallelXZFillTests.fill(path, bmap: nil, size: Int(size), into: dir.file("cache"))
    }

    @Test("an intact .zst fills the cache byte for byte as zstd -d makes it")
    func intactZstd() async throws {
        let dir = try TemporaryDirectory()
        let image = try Self.image(in: dir)
        try run("zstd", "-q", image, "-o", image + ".zst")
        let out = try await Self.fill(image + ".zst", into: dir)
        #expect(out.error == nil)
        try run("cmp", image, out.cache)
    }

    @Test("a .zst damaged where only its frame checksum can tell fails the fill, naming the checksum")
    func damagedZstdFailsOnItsChecksum() async throws {
        let dir = try TemporaryDirectory()
        let image = try Self.image(in: dir)
        try run("zstd", "-q", image, "-o", image + ".zst")
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: image + ".zst")))
        let rle = try #require(zstdBlocks(bytes).first { $0.type == 1 }, "an RLE block for the zeros")
        bytes[rle.offset + 3] = 0x5A  // the zeros decode as 0x5A: still a valid block
        let damaged = try dir.write("damaged.zst", bytes)
        // The premise, by zstd itself: it decodes all of it, and only the checksum objects.
        let test = try Command.run(["zstd", "-t", damaged])
        #expect(!test.succeeded && test.stderr.contains("checksum"), "zstd -t: \(test.stderr)")

        let out = try await Self.fill(damaged, into: dir)
        let error = try #require(out.error, "a damaged image must not fill the cache")
        #expect(error.code == .compressedStreamCorrupt && error.message.contains("checksum"), "\(error)")
    }

    @Test(".zst and .gz files of several frames or members, whose header declares less than they hold, fail the fill instead of cutting the image short", arguments: ["zstd", "gzip"])
    func moreThanItsHeaderSays(tool: String) async throws {
        let dir = try TemporaryDirectory()
        let first = try Self.image(in: dir, name: "first"), second = try Self.image(in: dir, name: "second")
        let joined = dir.file("joined")
        // Each frame (member) on its own, concatenated: a valid file whose decoded stream is both.
        try run("sh", "-c", "\(tool) -q -c '\(first)' > '\(joined)' && \(tool) -q -c '\(second)' >> '\(joined)'")
        let decoded = try run("sh", "-c", "\(tool) -d -c '\(joined)' | wc -c")
        #expect(decoded.trimmingCharacters(in: .whitespacesAndNewlines) == "\(2 * 524288)", "the premise: \(tool) -d gives both")
        let declared = try ImageSource(path: joined).uncompressedSizeHint
        #expect(declared == 524288, "the header declares one frame (member): \(String(describing: declared))")

        let out = try await Self.fill(joined, into: dir)
        let error = try #require(out.error, "a cache of the first \(declared ?? 0) bytes would be an image cut short")
        #expect(error.code == .imageCorrupt && error.message.contains("holds more than the 524288 bytes"), "\(error)")
    }
}
