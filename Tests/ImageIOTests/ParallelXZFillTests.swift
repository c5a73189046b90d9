#if canImport(Glibc)
import Glibc
#endif
import Foundation
@testable import ImageIO
import Testing
import TestSupport

/// The block-parallel .xz cache fill (issue 18), checked against xz(1) and bmaptool: what
/// `xz -d` makes is what the cache holds (mapped ranges only, with a bmap), `xz --robot -lvv`
/// says which blocks exist and what their decoders need.
///
/// Serialized: the leak checks count this process's `prov-xz-fill-*` threads, which only
/// these tests start.
@Suite("xz blocks decoded in parallel into the image cache", .serialized)
struct ParallelXZFillTests {
    static let mib = 1 << 20

    /// A sparse raw image of varied content (text, random, holes) whose size is not a
    /// multiple of the 1 MiB xz blocks, its bmap, and its multi-block .xz.
    struct Fixture {
        let dir: TemporaryDirectory
        let raw: String
        let xz: String
        let size: Int
        /// What the cache must hold with the bmap: the image on mapped ranges, zeros elsewhere.
        let expectedWithBmap: [UInt8]
        let bmap: Bmap

        /// Data segments (offset, bytes); everything else is a hole. `unmappedData` is written
        /// after the bmap is made: it is in the .xz, but the bmap does not map it.
        init(segments: [(Int, [UInt8])], size: Int, unmappedData: [(Int, [UInt8])] = [], blockSize: String = "1MiB") throws {
            dir = try TemporaryDirectory("provision-xzfill")
            raw = dir.file("disk.img")
            self.size = size
            let fd = open(raw, O_RDWR | O_CREAT | O_TRUNC, 0o644)
            guard fd >= 0 else { throw FixtureError("cannot create \(raw)") }
            func put(_ offset: Int, _ bytes: [UInt8]) {
                _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress!, $0.count, off_t(offset)) }
            }
            for (offset, bytes) in segments { put(offset, bytes) }
            ftruncate(fd, off_t(size))
            fsync(fd)
            try run("bmaptool", "-q", "create", "-o", raw + ".bmap", raw)
            for (offset, bytes) in unmappedData { put(offset, bytes) }
            close(fd)
            bmap = try Bmap.load(path: raw + ".bmap")
            xz = raw + ".xz"
            try run("sh", "-c", "xz -T2 --block-size=\(blockSize) -3 -c '\(raw)' > '\(xz)'")
            let image = try [UInt8](Data(contentsOf: URL(fileURLWithPath: raw)))
            var expected = [UInt8](repeating: 0, count: size)
            for r in bmap.mappedByteRanges { expected[Int(r.start)..<Int(r.end)] = image[Int(r.start)..<Int(r.end)] }
            expectedWithBmap = expected
        }

        /// The standard image: 9 MiB + 300001 bytes, blocks 2 and 3 and 9 without mapped data
        /// (2 and 3 hold data the bmap leaves out), block 8 half mapped.
        static func standard() throws -> Fixture {
            try Fixture(segments: [
                (0, text(mib)),
                (3 * mib, patternBytes(5 * mib / 2, seed: 7)),
                (6 * mib, text(mib + 100 * 1024)),
                (9 * mib, patternBytes(300_001, seed: 11)),
            ], size: 9 * mib + 300_001, unmappedData: [(mib + mib / 2, patternBytes(3 * mib / 2, seed: 3))])
        }
    }

    /// Compressible, like a root filesystem's text files.
    static func text(_ count: Int) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(count + 64)
        var line = 0
        while out.count < count {
            out += Array("line \(line): the quick brown fox jumps over the lazy dog \(line * 7919 % 1000)\n".utf8)
            line += 1
        }
        return Array(out.prefix(count))
    }

    /// One block of `xz --robot -lvv`.
    struct ListedBlock { let numberInFile: Int; let compressedOffset: UInt64; let uncompressedOffset: UInt64; let totalSize: UInt64; let uncompressedSize: UInt64; let memory: UInt64 }

    static func listBlocks(_ path: String) throws -> [ListedBlock] {
        try run("xz", "--robot", "-lvv", path).split(separator: "\n").compactMap { line in
            let f = line.split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
            guard f.first == "block", f.count >= 15 else { return nil }
            return ListedBlock(numberInFile: Int(f[3])!, compressedOffset: UInt64(f[4])!, uncompressedOffset: UInt64(f[5])!,
                               totalSize: UInt64(f[6])!, uncompressedSize: UInt64(f[7])!, memory: UInt64(f[14])!)
        }
    }

    /// Blocks of `listed` holding at least one byte of `ranges`.
    static func mappedBlockCount(_ listed: [ListedBlock], _ ranges: [(start: UInt64, end: UInt64)]) -> Int {
        listed.filter { b in ranges.contains { $0.start < b.uncompressedOffset + b.uncompressedSize && $0.end > b.uncompressedOffset } }.count
    }

    /// Fills a fresh cache file from `image` on a thread of its own (the source and the plan
    /// made there too, so nothing of the fill stays open afterwards).
    struct Outcome: Sendable { let cache: String; let decoderThreads: Int; let report: CacheFillReport; let error: ImageIOError? }

    static func fill(_ image: String, bmap: Bmap?, size: Int, into cache: String, threads: Int? = 3,
                     progress: CacheFill = CacheFill()) async throws -> Outcome {
        try await offPool {
            let source = try ImageSource(path: image)
            let plan = CacheFiller.plan(source: source, bmap: bmap, size: UInt64(size), xzThreads: threads)
            CacheFiller.fill(source: source, bmap: bmap, size: UInt64(size), into: cache, progress: progress, plan: plan)
            return Outcome(cache: cache, decoderThreads: plan.decoderThreads, report: progress.report, error: progress.error)
        }
    }

    static func fillThreads() -> Int {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        return tasks.filter { ((try? String(contentsOfFile: "/proc/self/task/\($0)/comm", encoding: .utf8)) ?? "").hasPrefix("prov-xz-fill") }.count
    }

    static func descriptors(onto paths: [String]) -> Int {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return fds.filter { fd in (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")).map(paths.contains) ?? false }.count
    }

    /// Offsets inside `range` where `path` has allocated data (SEEK_DATA): none for a hole.
    static func hasData(_ path: String, in range: (start: UInt64, end: UInt64)) -> Bool {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        let next = lseek(fd, off_t(range.start), 3 /* SEEK_DATA: Glibc hides it without _GNU_SOURCE */)
        return next >= 0 && UInt64(next) < range.end
    }

    @Test("without a bmap the cache is byte for byte what xz -d makes, decoded on several threads")
    func wholeImageMatchesXZ() async throws {
        let f = try Fixture.standard()
        try run("sh", "-c", "xz -d -c '\(f.xz)' > '\(f.dir.file("plain"))'")
        let out = try await Self.fill(f.xz, bmap: nil, size: f.size, into: f.dir.file("cache"))
        #expect(out.error == nil)
        #expect(out.decoderThreads == 3)
        #expect(out.report.decoderThreads == 3)
        let listed = try Self.listBlocks(f.xz)
        #expect(listed.count == 10)
        #expect(out.report.blocks == listed.count && out.report.blocksDecoded == listed.count && out.report.blocksSkipped == 0)
        try run("cmp", f.dir.file("plain"), out.cache)
    }

    @Test("with a bmap only mapped ranges hold data, the rest are holes, and blocks without mapped data are not decoded")
    func mappedRangesOnly() async throws {
        let f = try Fixture.standard()
        try f.dir.write("expected", f.expectedWithBmap)
        let out = try await Self.fill(f.xz, bmap: f.bmap, size: f.size, into: f.dir.file("cache"))
        #expect(out.error == nil)
        try run("cmp", f.dir.file("expected"), out.cache)
        // The data the bmap leaves out (blocks 2 and 3) is in the .xz: the cache must not have it.
        #expect(try run("sh", "-c", "xz -d -c '\(f.xz)' | cmp -s - '\(out.cache)' || echo differs") == "differs\n")
        var previousEnd: UInt64 = 0
        for r in f.bmap.mappedByteRanges + [(start: UInt64(f.size), end: UInt64(f.size))] {
            if r.start > previousEnd { #expect(!Self.hasData(out.cache, in: (previousEnd, r.start)), "unmapped bytes \(previousEnd)..<\(r.start) hold data") }
            previousEnd = r.end
        }
        let listed = try Self.listBlocks(f.xz)
        let mapped = Self.mappedBlockCount(listed, f.bmap.mappedByteRanges)
        #expect(mapped == 7)
        #expect(out.report == CacheFillReport(decoderThreads: 3, blocks: listed.count, blocksDecoded: mapped, blocksSkipped: listed.count - mapped,
                                              tailBytesSkipped: Self.tailsAfterLastMappedByte(listed, f.bmap.mappedByteRanges)))
        #expect(out.report.tailBytesSkipped! > 0, "block 8 ends in a hole")
    }

    /// For each block of `listed` holding mapped bytes: how far it runs past its last one.
    static func tailsAfterLastMappedByte(_ listed: [ListedBlock], _ ranges: [(start: UInt64, end: UInt64)]) -> UInt64 {
        listed.reduce(0) { sum, b in
            let end = b.uncompressedOffset + b.uncompressedSize
            let inside = ranges.filter { $0.start < end && $0.end > b.uncompressedOffset }
            guard let last = inside.map({ min($0.end, end) }).max() else { return sum }
            return sum + end - last
        }
    }

    @Test("with a checksummed bmap a block is decoded only to its last mapped byte: damage after it is never read; without checksums it is")
    func stopsAtLastMappedByte() async throws {
        let mib = Self.mib
        // Block 2 (1–2 MiB): mapped text to 1.25 MiB, then text the bmap leaves out (written
        // after it was made): kilobytes of compressed data after the last mapped byte.
        // Block 4: mapped to 3.5 MiB, a hole after.
        let f = try Fixture(segments: [(0, Self.text(mib + mib / 4)), (3 * mib, patternBytes(mib / 2, seed: 5))], size: 4 * mib,
                            unmappedData: [(mib + mib / 4 + 4096, Self.text(mib / 2))])
        let listed = try Self.listBlocks(f.xz)
        #expect(listed.count == 4)
        #expect(Self.tailsAfterLastMappedByte(listed, f.bmap.mappedByteRanges) == UInt64(3 * mib / 4 + mib / 2))
        // Damage the end of block 2's compressed data (before its padding and 8-byte check).
        let block2 = listed[1]
        let fd = open(f.xz, O_RDWR)
        var bytes = [UInt8](repeating: 0, count: 16)
        let at = off_t(block2.compressedOffset + block2.totalSize - 28)
        #expect(pread(fd, &bytes, 16, at) == 16)
        bytes = bytes.map { $0 ^ 0x55 }
        #expect(pwrite(fd, bytes, 16, at) == 16)
        close(fd)
        // The premise, by xz(1) itself: the block's data (not only its check) is broken.
        #expect(try Command.run(["xz", "-t", "--ignore-check", f.xz]).status != 0)

        let out = try await Self.fill(f.xz, bmap: f.bmap, size: f.size, into: f.dir.file("cache"))
        #expect(out.error == nil, "\(String(describing: out.error))")
        try f.dir.write("expected", f.expectedWithBmap)
        try run("cmp", f.dir.file("expected"), out.cache)
        #expect(out.report.tailBytesSkipped == UInt64(3 * mib / 4 + mib / 2))

        // A bmap without checksums leaves the blocks' checks to prove the data: decoded whole.
        try run("bmaptool", "-q", "create", "--no-checksum", "-o", f.dir.file("plain.bmap"), f.raw)
        let plain = try Bmap.load(path: f.dir.file("plain.bmap"))
        #expect(!plain.checksumsEveryRange)
        let whole = try await Self.fill(f.xz, bmap: plain, size: f.size, into: f.dir.file("cache2"))
        let error = try #require(whole.error)
        #expect(error.code == .compressedStreamCorrupt && error.message.contains("xz block 2 of \(f.xz)"), "\(error.message)")
        #expect(Self.fillThreads() == 0)
    }

    @Test("the thread count is min(cores, 24 MiB / (decoder + 2 MiB of buffers), blocks with mapped data)")
    func naturalThreadCount() async throws {
        let f = try Fixture.standard()
        let listed = try Self.listBlocks(f.xz)
        let perWorker = listed.map(\.memory).max()! + 2 << 20
        let expected = min(ProcessInfo.processInfo.activeProcessorCount, Int((24 << 20) / perWorker), Self.mappedBlockCount(listed, f.bmap.mappedByteRanges))
        let out = try await Self.fill(f.xz, bmap: f.bmap, size: f.size, into: f.dir.file("cache"), threads: nil)
        #expect(out.error == nil)
        #expect(out.decoderThreads == (expected >= 2 ? expected : 1))
        try f.dir.write("expected", f.expectedWithBmap)
        try run("cmp", f.dir.file("expected"), out.cache)
    }

    @Test("on its own the fill decodes on one thread; it adds threads, up to the plan's count, only while a reader waits beyond the watermark")
    func threadsOnDemand() async throws {
        // 32 MiB of base64 text in 32 blocks: slow enough to decode (literals) that the first
        // worker is still on its first blocks when the watermark first moves.
        let dir = try TemporaryDirectory("provision-xzfill-demand")
        try run("sh", "-c", "head -c \(24 * Self.mib) /dev/urandom | base64 -w 76 | head -c \(32 * Self.mib) > '\(dir.file("text"))'")
        let f = try Fixture(segments: [(0, [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir.file("text")))))], size: 32 * Self.mib)
        try f.dir.write("expected", f.expectedWithBmap)

        // No reader: one worker from start to end. (Counted by the fill's report, the threads
        // it made: other suites' fills run in this process meanwhile, so its thread list
        // cannot tell whose a prov-xz-fill thread is.)
        let alone = try await Self.fill(f.xz, bmap: f.bmap, size: f.size, into: f.dir.file("cache1"), threads: nil)
        let cap = alone.decoderThreads
        try #require(cap >= 2, "the plan allows one thread here (\(ProcessInfo.processInfo.activeProcessorCount) cores): nothing to add")
        #expect(alone.error == nil)
        #expect(alone.report.decoderThreads == 1, "\(alone.report.decoderThreads) threads started with no reader")
        #expect(alone.report.blocksDecoded == 32)
        try run("cmp", f.dir.file("expected"), alone.cache)

        // A reader already waiting for the whole image: every advance leaves it waiting, so
        // the fill grows to its plan's count.
        let busy = CacheFill()
        let reader = Thread { _ = try? busy.wait(upTo: UInt64(f.size)) }
        reader.start()
        let deadline = ContinuousClock.now + .seconds(60)
        while !busy.readerWaiting && ContinuousClock.now < deadline { usleep(1000) }
        try #require(busy.readerWaiting, "the reader thread never began to wait")
        let helped = try await Self.fill(f.xz, bmap: f.bmap, size: f.size, into: f.dir.file("cache2"), threads: nil, progress: busy)
        #expect(helped.error == nil)
        #expect(helped.report.decoderThreads == cap, "\(helped.report.decoderThreads) of \(cap) threads started")
        #expect(helped.report.blocksDecoded == 32)
        #expect(!busy.readerWaiting)
        try run("cmp", f.dir.file("expected"), helped.cache)
    }

    @Test("a 64 MiB dictionary (xz -9) does not fit the memory cap twice: the serial decoder runs")
    func largeDictionaryStaysSerial() async throws {
        let f = try Fixture.standard()
        let xz9 = f.dir.file("nine.xz")
        try run("sh", "-c", "xz -T2 --block-size=1MiB -9 -c '\(f.raw)' > '\(xz9)'")
        #expect(try Self.listBlocks(xz9).count == 10)
        let out = try await Self.fill(xz9, bmap: f.bmap, size: f.size, into: f.dir.file("cache"), threads: nil)
        #expect(out.error == nil)
        #expect(out.decoderThreads == 1 && out.report == CacheFillReport(decoderThreads: 1))
        try f.dir.write("expected", f.expectedWithBmap)
        try run("cmp", f.dir.file("expected"), out.cache)
    }

    @Test("two concatenated streams with stream padding decode as xz -d does")
    func concatenatedStreams() async throws {
        let f = try Fixture.standard()
        let second = f.dir.file("second.img")
        try f.dir.write("second.img", Self.text(2 * Self.mib + 12_345) + patternBytes(Self.mib, seed: 5))
        let joined = f.dir.file("joined.xz")
        try run("sh", "-c", """
            xz -T2 --block-size=512KiB -3 -c '\(second)' > '\(second).xz' &&
            { cat '\(f.xz)'; head -c 8 /dev/zero; cat '\(second).xz'; head -c 4 /dev/zero; } > '\(joined)' &&
            xz -d -c '\(joined)' > '\(f.dir.file("plain"))'
            """)
        let size = f.size + 3 * Self.mib + 12_345
        #expect(try Int(run("stat", "-c", "%s", f.dir.file("plain")).trimmingCharacters(in: .whitespacesAndNewlines)) == size)
        let listed = try Self.listBlocks(joined)
        #expect(listed.count == 10 + 7)
        let out = try await Self.fill(joined, bmap: nil, size: size, into: f.dir.file("cache"))
        #expect(out.error == nil)
        #expect(out.decoderThreads == 3 && out.report.blocksDecoded == listed.count)
        try run("cmp", f.dir.file("plain"), out.cache)
    }

    @Test("a single-block .xz takes the serial path and still matches")
    func singleBlockIsSerial() async throws {
        let f = try Fixture.standard()
        let single = f.dir.file("single.xz")
        try run("sh", "-c", "xz -T1 -3 -c '\(f.raw)' > '\(single)'")
        #expect(try Self.listBlocks(single).count == 1)
        let out = try await Self.fill(single, bmap: f.bmap, size: f.size, into: f.dir.file("cache"))
        #expect(out.error == nil)
        #expect(out.decoderThreads == 1 && out.report == CacheFillReport(decoderThreads: 1))
        try f.dir.write("expected", f.expectedWithBmap)
        try run("cmp", f.dir.file("expected"), out.cache)
    }

    @Test("a byte flipped inside a middle block: compressedStreamCorrupt naming that block; no thread or descriptor left behind")
    func corruptMiddleBlock() async throws {
        let f = try Fixture.standard()
        let listed = try Self.listBlocks(f.xz)
        // Block 5: random data at 4–5 MiB, stored nearly as is; the flip lands in its data.
        let victim = listed[4]
        #expect(victim.numberInFile == 5)
        let at = victim.compressedOffset + victim.totalSize / 2
        let fd = open(f.xz, O_RDWR)
        var byte: UInt8 = 0
        #expect(pread(fd, &byte, 1, off_t(at)) == 1)
        byte ^= 0x55
        #expect(pwrite(fd, &byte, 1, off_t(at)) == 1)
        close(fd)
        let cache = f.dir.file("cache")
        #expect(Self.fillThreads() == 0)
        let out = try await Self.fill(f.xz, bmap: nil, size: f.size, into: cache)
        let error = try #require(out.error)
        #expect(error.code == .compressedStreamCorrupt)
        #expect(error.message.contains("xz block 5 of \(f.xz)"), "\(error.message)")
        #expect(error.message.contains("at byte \(victim.compressedOffset) of the file"), "\(error.message)")
        #expect(error.offset == victim.compressedOffset)
        #expect(out.decoderThreads == 3)
        #expect(Self.fillThreads() == 0, "decoder threads still running after the fill ended")
        #expect(Self.descriptors(onto: [f.xz, cache]) == 0, "descriptors of the image or the cache still open")
    }

    @Test("a bmap checksum altered: imageCorrupt, the same error as the serial decoder's")
    func alteredBmapChecksum() async throws {
        let f = try Fixture.standard()
        // The range starting at 6 MiB (block 7): change its checksum's first hex digit.
        var xml = try String(contentsOfFile: f.raw + ".bmap", encoding: .utf8)
        let first = 6 * Self.mib / 4096
        let pattern = try Regex("<Range chksum=\"([0-9a-f])([0-9a-f]+)\"> *\(first)-")
        let match = try #require(xml.firstMatch(of: pattern))
        let digit = String(match.output[1].substring!)
        xml.replaceSubrange(match.range, with: String(xml[match.range]).replacingOccurrences(of: "\"\(digit)", with: digit == "0" ? "\"1" : "\"0"))
        let badPath = f.dir.file("bad.bmap")
        try xml.write(toFile: badPath, atomically: true, encoding: .utf8)
        // The bmap's checksum of itself, made again as bmaptool makes it (its own digits zeroed).
        try run("sh", "-c", """
            sum=$(sed -n 's:.*<BmapFileChecksum> *\\([0-9a-f]*\\) *</BmapFileChecksum>.*:\\1:p' '\(badPath)') && zeros=$(printf '%064d' 0) &&
            sed -i "s/$sum/$zeros/" '\(badPath)' && sed -i "s/$zeros/$(sha256sum '\(badPath)' | cut -d' ' -f1)/" '\(badPath)'
            """)
        let bad = try Bmap.load(path: badPath)
        let parallel = try await Self.fill(f.xz, bmap: bad, size: f.size, into: f.dir.file("cache1"))
        let serial = try await Self.fill(f.xz, bmap: bad, size: f.size, into: f.dir.file("cache2"), threads: 1)
        #expect(parallel.decoderThreads == 3 && serial.decoderThreads == 1)
        let error = try #require(parallel.error)
        #expect(error.code == .imageCorrupt)
        #expect(error == serial.error)
        #expect(Self.fillThreads() == 0)
    }

    @Test("an image ending before the bmap's last mapped byte: bmapMismatch, as the serial decoder says")
    func imageShorterThanBmap() async throws {
        let f = try Fixture.standard()
        // A bmap of the image with 2 more mapped MiB at its end.
        let longer = f.dir.file("longer.img")
        try run("cp", "--sparse=always", f.raw, longer)
        try run("sh", "-c", "truncate -s \(f.size + 3 * Self.mib) '\(longer)' && head -c 2097152 /dev/urandom | dd of='\(longer)' bs=1M seek=10 conv=notrunc status=none && bmaptool -q create -o '\(longer).bmap' '\(longer)'")
        let bmap = try Bmap.load(path: longer + ".bmap")
        let parallel = try await Self.fill(f.xz, bmap: bmap, size: f.size + 3 * Self.mib, into: f.dir.file("cache1"))
        let serial = try await Self.fill(f.xz, bmap: bmap, size: f.size + 3 * Self.mib, into: f.dir.file("cache2"), threads: 1)
        #expect(parallel.decoderThreads == 3)
        let error = try #require(parallel.error)
        #expect(error.code == .bmapMismatch)
        #expect(error == serial.error)
    }

    @Test("a bmap of a shorter image (the last block straddles its end): the cache is what the serial decoder makes")
    func bmapOfShorterImage() async throws {
        let f = try Fixture.standard()
        let shorter = f.dir.file("shorter.img")
        // Inside the random data at 9 MiB, which the last 1 MiB block holds.
        let size = 9 * Self.mib + 150_000
        try run("sh", "-c", "cp --sparse=always '\(f.raw)' '\(shorter)' && truncate -s \(size) '\(shorter)' && bmaptool -q create -o '\(shorter).bmap' '\(shorter)'")
        let bmap = try Bmap.load(path: shorter + ".bmap")
        #expect(bmap.mappedByteRanges.last.map { $0.end == UInt64(size) } == true)
        let parallel = try await Self.fill(f.xz, bmap: bmap, size: size, into: f.dir.file("cache1"))
        let serial = try await Self.fill(f.xz, bmap: bmap, size: size, into: f.dir.file("cache2"), threads: 1)
        #expect(parallel.decoderThreads == 3 && serial.decoderThreads == 1)
        #expect(parallel.error == nil && serial.error == nil)
        try run("cmp", parallel.cache, serial.cache)
        try run("cmp", parallel.cache, shorter)
    }

    @Test("a truncated .xz (no index to read) falls back to the serial decoder, which reports the truncation")
    func truncatedFallsBack() async throws {
        let f = try Fixture.standard()
        let cut = f.dir.file("cut.xz")
        try run("sh", "-c", "head -c $(( $(stat -c %s '\(f.xz)') - 150000 )) '\(f.xz)' > '\(cut)'")
        let out = try await Self.fill(cut, bmap: f.bmap, size: f.size, into: f.dir.file("cache"))
        #expect(out.decoderThreads == 1)
        #expect(out.error?.code == .compressedStreamTruncated)
    }

    @Test("at every advance of the watermark, the bytes below it are already right",
          arguments: [true, false])
    func readerSeesOnlyFinishedBytes(withBmap: Bool) async throws {
        let f = try Fixture(segments: [
            (0, Self.text(3 * Self.mib)),
            (3 * Self.mib, patternBytes(2 * Self.mib, seed: 13)),
            (6 * Self.mib, Self.text(5 * Self.mib)),
        ], size: 11 * Self.mib + 777, blockSize: "3MiB")
        // Blocks of 3 MiB, larger than a worker's 1 MiB buffer: the watermark moves inside
        // the lowest unfinished block too, and must never pass what it has written.
        #expect(try Self.listBlocks(f.xz).count == 4)
        let cache = f.dir.file("cache")
        let progress = CacheFill()
        _ = FileManager.default.createFile(atPath: cache, contents: nil)
        // Without a bmap nothing checks the bytes on the way: only the watermark's rule does.
        let expected = withBmap ? f.expectedWithBmap : try [UInt8](Data(contentsOf: URL(fileURLWithPath: f.raw)))
        // Checked on the filling thread at every advance (a reader thread of its own could be
        // scheduled only after the fill ended, on a loaded machine, and see one advance).
        let fd = open(cache, O_RDONLY)
        defer { close(fd) }
        nonisolated(unsafe) var seen = (advances: 0, checkedUpTo: 0, wrong: [UInt64]())
        nonisolated(unsafe) var buffer = [UInt8](repeating: 0, count: 1 << 20)
        progress.afterAdvance = { watermark in
            let mark = Int(watermark)
            guard mark > seen.checkedUpTo else { return }
            seen.advances += 1
            var pos = seen.checkedUpTo
            while pos < mark {
                let n = min(buffer.count, mark - pos)
                let got = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, n, off_t(pos)) }
                let same = buffer.withUnsafeBytes { b in expected.withUnsafeBytes { memcmp(b.baseAddress!, $0.baseAddress! + pos, n) == 0 } }
                if got != n || !same { seen.wrong.append(UInt64(pos)) }
                pos += n
            }
            seen.checkedUpTo = mark
        }
        let out = try await Self.fill(f.xz, bmap: withBmap ? f.bmap : nil, size: f.size, into: cache, threads: 2, progress: progress)
        #expect(out.error == nil)
        #expect(out.decoderThreads == 2)
        #expect(seen.wrong.isEmpty, "bytes below the watermark not yet right at offsets \(seen.wrong.prefix(5))")
        // 1 MiB reports inside 3 MiB blocks: the watermark moves many times.
        #expect(seen.advances > 1)
        #expect(seen.checkedUpTo == f.size)
        #expect(progress.filledUpTo == UInt64(f.size))
    }
}
