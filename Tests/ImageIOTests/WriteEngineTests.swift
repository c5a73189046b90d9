import BlockDevices
import Foundation
@testable import ImageIO
import Testing
import TestSupport

/// Every test here writes real loop devices ("cards"); that needs root, which this project's
/// test machines and CI have.
@Suite("Write engine on loop-device cards", .serialized, .ownThread)
struct WriteEngineTests {
    let scratch: TemporaryDirectory
    init() throws { scratch = try TemporaryDirectory("provision-test") }

    /// Writes `imagePath` to a fresh card filled with 0xAA so that untouched bytes are visible.
    func writeToFreshCard(_ imagePath: String, size: Int64 = 64 << 20, options: WriteOptions = WriteOptions(),
                          progress: @escaping @Sendable (WriteProgress) -> Void = { _ in }) throws -> (LoopCard, Result<WriteResult, ImageIOError>) {
        let fill = scratch.file("fill-\(UUID().uuidString.prefix(6)).img")
        try write([UInt8](repeating: 0xAA, count: Int(size)), to: fill)
        let card = try LoopCard(label: "engine", size: size, image: fill)
        let result: Result<WriteResult, ImageIOError>
        do {
            let source = try ImageSource(path: imagePath)
            let target = try WriteTarget.open(path: card.devicePath)
            result = .success(try ImageWriter.write(source: source, to: target, options: options, progress: progress))
        } catch {
            result = .failure(error)
        }
        return (card, result)
    }

    @Test("raw, gzip, xz and zstd images land byte-exact", arguments: ["raw", "gz", "xz", "zst"])
    func writesEveryFormatByteExact(format: String) throws {
        let data = patternBytes(9 << 20 + 12345 * 512)
        let raw = scratch.file("image.raw")
        try write(data, to: raw)
        var image = raw
        switch format {
        case "gz": try run("gzip", "-k", "-f", raw); image = raw + ".gz"
        case "xz": try run("xz", "-k", "-f", "-0", raw); image = raw + ".xz"
        case "zst": try run("zstd", "-q", "-f", raw, "-o", raw + ".zst"); image = raw + ".zst"
        default: break
        }
        // The name says nothing: rename compressed images to .img to prove magic bytes decide.
        let disguised = scratch.file("disguised-\(format).img")
        try FileManager.default.copyItem(atPath: image, toPath: disguised)
        #expect(try ImageSource(path: disguised).format.rawValue == (format == "gz" ? "gzip" : format == "zst" ? "zstd" : format))
        let (card, result) = try writeToFreshCard(disguised)
        defer { card.close() }
        let written = try result.get()
        #expect(written.verified)
        #expect(written.imageSize == UInt64(data.count))
        #expect(try readBytes(card.devicePath, count: data.count) == data)
        // Beyond the image the card is untouched.
        #expect(try readBytes(card.devicePath, offset: UInt64(data.count), count: 4096) == [UInt8](repeating: 0xAA, count: 4096))
    }

    @Test("an image whose size is not a multiple of the block size is written exactly, the rest of its last block kept")
    func writesUnalignedTail() throws {
        let data = patternBytes(3 << 20 + 777)
        let raw = scratch.file("odd.raw")
        try write(data, to: raw)
        let (card, result) = try writeToFreshCard(raw)
        defer { card.close() }
        _ = try result.get()
        let back = try readBytes(card.devicePath, count: data.count + 512)
        #expect(Array(back.prefix(data.count)) == data)
        #expect(Array(back.suffix(512)) == [UInt8](repeating: 0xAA, count: 512))
    }

    @Test("a card altered between write and verify is caught at the exact byte offset")
    func verificationCatchesAlteredCard() throws {
        let data = patternBytes(10 << 20)
        let raw = scratch.file("v.raw")
        try write(data, to: raw)
        var options = WriteOptions()
        let badOffset: UInt64 = 6 * 1024 * 1024 + 4242
        // Nothing is read back before the hook: verification waits for the final sync.
        options.syncInterval = nil
        // The mismatch itself, without the repair attempt (RepairTests cover that).
        options.repair = false
        options.testHookBeforeVerify = { target in
            // Flip one byte behind the writer's back, through a separate buffered descriptor.
            let h = FileHandle(forUpdatingAtPath: target.path)!
            try? h.seek(toOffset: badOffset)
            h.write(Data([data[Int(badOffset)] ^ 0xFF]))
            try? h.synchronize()
            try? h.close()
        }
        let (card, result) = try writeToFreshCard(raw, options: options)
        defer { card.close() }
        guard case .failure(let e) = result else { Issue.record("altered card passed verification"); return }
        #expect(e.code == .verifyMismatch)
        #expect(e.offset == badOffset)
        #expect(e.message.contains("\(badOffset)"))
    }

    @Test("on a station's budget a chunk is read back in pieces: a byte altered in a later piece is found exactly, and a repair rewrites that piece")
    func piecesOfAChunkOnABudget() throws {
        let data = patternBytes(10 << 20)
        let raw = scratch.file("pieces.raw")
        try write(data, to: raw)
        // In the third 256 KiB piece of the 4 MiB chunk at 4 MiB.
        let badOffset: UInt64 = (4 << 20) + 2 * 262_144 + 12_345
        #expect(BackgroundVerifier.piece == 262_144)
        for repair in [false, true] {
            let budget = BufferBudget(limit: 16 << 20)
            var options = WriteOptions()
            options.budget = budget
            options.chunkSize = 4 << 20
            options.syncInterval = nil
            options.repair = repair
            options.testHookBeforeVerify = { target in
                let h = FileHandle(forUpdatingAtPath: target.path)!
                try? h.seek(toOffset: badOffset)
                h.write(Data([data[Int(badOffset)] ^ 0x40]))
                try? h.synchronize()
                try? h.close()
            }
            let (card, result) = try writeToFreshCard(raw, options: options)
            defer { card.close() }
            #expect(budget.usage.handedOut == 0)
            if repair {
                #expect(try result.get().repairedAt == [badOffset])
                #expect(Array(try readBytes(card.devicePath, count: data.count)) == data)
            } else {
                guard case .failure(let e) = result else { Issue.record("altered card passed verification"); continue }
                #expect(e.code == .verifyMismatch && e.offset == badOffset, "\(e)")
            }
        }
    }

    @Test("spliced onto a card on a budget, an image ending inside a block keeps the card's bytes after its end; a cancel stops the splice with the budget given back")
    func splicedImageEndingInsideABlock() throws {
        let data = patternBytes((5 << 20) + 1000)
        let raw = scratch.file("unaligned.raw")
        try write(data, to: raw)
        let budget = BufferBudget(limit: 16 << 20)
        var options = WriteOptions()
        options.budget = budget
        let (card, result) = try writeToFreshCard(raw, options: options)
        defer { card.close() }
        #expect(try result.get().bytesWritten == UInt64(data.count))
        #expect(Array(try readBytes(card.devicePath, count: data.count)) == data)
        // The rest of the last 512-byte block, and the block after it, as they were.
        #expect(try readBytes(card.devicePath, offset: UInt64(data.count), count: 512 - 1000 % 512 + 512) == [UInt8](repeating: 0xAA, count: 512 - 1000 % 512 + 512))
        #expect(budget.usage.peakHandedOut <= ImageWriter.readBackPiece)

        // Cancelled at the first progress report: no chunk after it is written.
        var cancelled = options
        let flag = CancellationFlag()
        cancelled.cancellation = flag
        let (second, outcome) = try writeToFreshCard(raw, options: cancelled, progress: { _ in flag.cancel() })
        defer { second.close() }
        guard case .failure(let e) = outcome else { Issue.record("a cancelled write succeeded"); return }
        #expect(e.code == .cancelled)
        #expect(try readBytes(second.devicePath, offset: 4 << 20, count: 4096) == [UInt8](repeating: 0xAA, count: 4096))
        #expect(budget.usage.handedOut == 0)
    }

    @Test("a compressed image's mismatch offset is found too (decoded again only on failure)")
    func verificationMismatchOffsetForCompressed() throws {
        let data = patternBytes(5 << 20)
        let raw = scratch.file("c.raw")
        try write(data, to: raw)
        try run("zstd", "-q", "-f", raw, "-o", raw + ".zst")
        var options = WriteOptions()
        // Nothing is read back before the hook: verification waits for the final sync.
        options.syncInterval = nil
        // The mismatch itself, without the repair attempt (RepairTests cover that).
        options.repair = false
        options.testHookBeforeVerify = { target in
            let h = FileHandle(forUpdatingAtPath: target.path)!
            try? h.seek(toOffset: 4_500_001)
            h.write(Data([data[4_500_001] ^ 0x01]))
            try? h.close()
        }
        let (card, result) = try writeToFreshCard(raw + ".zst", options: options)
        defer { card.close() }
        guard case .failure(let e) = result else { Issue.record("altered card passed verification"); return }
        #expect(e.code == .verifyMismatch && e.offset == 4_500_001)
    }

    @Test("--no-verify skips the read-back")
    func noVerifySkipsReadBack() throws {
        let raw = scratch.file("nv.raw")
        try write(patternBytes(1 << 20), to: raw)
        var options = WriteOptions()
        options.verify = false
        nonisolated(unsafe) var hookRan = false
        options.testHookBeforeVerify = { _ in hookRan = true }
        let (card, result) = try writeToFreshCard(raw, options: options)
        defer { card.close() }
        #expect(try result.get().verified == false)
        #expect(!hookRan)
    }

    @Test("the partition-table chunk is written last: a cancelled write leaves offset 0 untouched")
    func cancelledWriteLeavesFirstChunkUnwritten() throws {
        let data = patternBytes(24 << 20)
        let raw = scratch.file("cancel.raw")
        try write(data, to: raw)
        let fill = scratch.file("fill-cancel.img")
        try write([UInt8](repeating: 0xAA, count: 64 << 20), to: fill)
        let card = try LoopCard(label: "cancel", size: 64 << 20, image: fill)
        defer { card.close() }
        // SD-card speed, so that progress is reported while chunks are still being written.
        try card.throttle(writeBytesPerSecond: 16 << 20)
        let options = WriteOptions()
        let flag = options.cancellation
        let source = try ImageSource(path: raw)
        let target = try WriteTarget.open(path: card.devicePath)
        do {
            _ = try ImageWriter.write(source: source, to: target, options: options) { p in
                if p.phase == .writing && p.bytesDone >= 8 << 20 { flag.cancel() }
            }
            Issue.record("a cancelled write reported success")
        } catch {
            #expect(error.code == .cancelled)
            #expect(error.message.contains("incomplete"))
        }
        try card.removeThrottle()
        // The whole head (partition table and boot loader area) is held back…
        #expect(try readBytes(card.devicePath, count: 1 << 20) == [UInt8](repeating: 0xAA, count: 1 << 20))
        // …while later chunks did reach the card.
        #expect(try readBytes(card.devicePath, offset: 4 << 20, count: 4096) == Array(data[(4 << 20)..<((4 << 20) + 4096)]))
    }

    @Test("a card smaller than the image is refused before the first byte")
    func refusesTooSmallCardBeforeWriting() throws {
        let raw = scratch.file("big.raw")
        try write(patternBytes(40 << 20), to: raw)
        let (card, result) = try writeToFreshCard(raw, size: 32 << 20)
        defer { card.close() }
        guard case .failure(let e) = result else { Issue.record("wrote to a too-small card"); return }
        #expect(e.code == .deviceTooSmall)
        #expect(e.message.contains("card too small: image needs \(40 << 20) bytes, card \(card.devicePath) has \(32 << 20)"))
        #expect(try readBytes(card.devicePath, count: 1 << 20) == [UInt8](repeating: 0xAA, count: 1 << 20))
    }

    @Test("a gzip image too large to know its size fails as 'card too small' at the card's end")
    func streamLargerThanCardFailsAtTheEnd() throws {
        // No bmap and a size hint the engine cannot see: a raw image in a pipe-like gzip stream
        // whose trailer lies (concatenated members make ISIZE cover only the last one).
        let a = scratch.file("a.raw"), b = scratch.file("b.raw")
        try write(patternBytes(20 << 20, seed: 1), to: a)
        try write(patternBytes(1 << 20, seed: 2), to: b)
        try run("gzip", "-f", a); try run("gzip", "-f", b)
        let cat = scratch.file("cat.img.gz")
        let joined = try Data(contentsOf: URL(fileURLWithPath: a + ".gz")) + Data(contentsOf: URL(fileURLWithPath: b + ".gz"))
        try joined.write(to: URL(fileURLWithPath: cat))
        let (card, result) = try writeToFreshCard(cat, size: 16 << 20)
        defer { card.close() }
        guard case .failure(let e) = result else { Issue.record("wrote past the card's end"); return }
        #expect(e.code == .deviceTooSmall)
    }

    @Test("regular files are targets too")
    func writesRegularFile() throws {
        let data = patternBytes(3 << 20 + 100)
        let raw = scratch.file("f.raw")
        try write(data, to: raw)
        try run("xz", "-k", "-0", raw)
        let out = scratch.file("out.img")
        let result = try ImageWriter.write(source: try ImageSource(path: raw + ".xz"), to: try WriteTarget.open(path: out))
        #expect(result.verified)
        #expect(try Data(contentsOf: URL(fileURLWithPath: out)) == Data(data))
    }

    @Test("raw blobs land at their offsets, inside and beyond the image, and are verified")
    func writesRawBlobs() throws {
        let data = patternBytes(2 << 20)
        let raw = scratch.file("blob.raw")
        try write(data, to: raw)
        var options = WriteOptions()
        let inside = patternBytes(5000, seed: 7), beyond = patternBytes(3000, seed: 8)
        options.blobs = [RawBlob(name: "spl", offset: 8192, bytes: inside), RawBlob(name: "env", offset: 3 << 20, bytes: beyond)]
        let (card, result) = try writeToFreshCard(raw, options: options)
        defer { card.close() }
        #expect(try result.get().verified)
        #expect(try readBytes(card.devicePath, offset: 8192, count: 5000) == inside)
        #expect(try readBytes(card.devicePath, offset: 3 << 20, count: 3000) == beyond)
        #expect(try readBytes(card.devicePath, offset: 0, count: 8192) == Array(data.prefix(8192)))
        #expect(try readBytes(card.devicePath, offset: 8192 + 5000, count: 100) == Array(data[(8192 + 5000)..<(8192 + 5100)]))
    }
}
