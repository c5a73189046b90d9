import Foundation
@testable import ImageIO
import Testing
import TestSupport

/// Each failure an operator can meet gets its own code and a message that names the problem.
@Suite("Write engine failures", .serialized)
struct ErrorTests {
    let scratch: TemporaryDirectory
    init() throws { scratch = try TemporaryDirectory("provision-test") }

    @Test("a missing image is 'image not found' naming the path")
    func missingImage() {
        #expect(throws: ImageIOError.self) { try ImageSource(path: "/nonexistent/x.img.xz") }
        do { _ = try ImageSource(path: "/nonexistent/x.img.xz") } catch {
            #expect(error.code == .imageMissing && error.message.contains("/nonexistent/x.img.xz"))
        }
    }

    @Test("an unreadable image (a directory) is refused clearly")
    func unreadableImage() {
        do { _ = try ImageSource(path: scratch.url.path); Issue.record("opened a directory") } catch {
            #expect(error.code == .imageUnreadable)
        }
    }

    @Test("a truncated compressed stream fails with the offset reached", arguments: ["gz", "xz", "zst"])
    func truncatedStream(format: String) throws {
        let raw = scratch.file("t.raw")
        try write(patternBytes(6 << 20), to: raw)
        let compressed = try compress(raw, format)
        let bytes = try Data(contentsOf: URL(fileURLWithPath: compressed))
        let cut = scratch.file("cut.\(format)")
        try bytes.prefix(bytes.count * 2 / 3).write(to: URL(fileURLWithPath: cut))
        let card = try LoopCard(label: "trunc", size: 16 << 20)
        defer { card.close() }
        let e = try #require(attemptWrite(try ImageSource(path: cut), on: card))
        #expect(e.code == .compressedStreamTruncated, "\(e)")
        #expect(e.message.contains("truncated") && e.offset != nil)
    }

    @Test("a corrupt compressed stream fails naming the place", arguments: ["gz", "xz", "zst"])
    func corruptStream(format: String) throws {
        let raw = scratch.file("c.raw")
        try write(patternBytes(6 << 20), to: raw)
        let compressed = try compress(raw, format)
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: compressed)))
        for i in stride(from: bytes.count / 2, to: bytes.count / 2 + 64, by: 1) { bytes[i] ^= 0x5A }
        let bad = scratch.file("bad.\(format)")
        try write(bytes, to: bad)
        let card = try LoopCard(label: "corrupt", size: 16 << 20)
        defer { card.close() }
        let e = try #require(attemptWrite(try ImageSource(path: bad), on: card))
        #expect(e.code == .compressedStreamCorrupt, "\(e)")
        #expect(e.message.contains("corrupt"))
    }

    @Test("a device held open exclusively by another program is 'busy'")
    func busyDevice() throws {
        let raw = scratch.file("b.raw")
        try write(patternBytes(1 << 20), to: raw)
        let card = try LoopCard(label: "busy", size: 8 << 20)
        defer { card.close() }
        let holder = open(card.devicePath, O_RDONLY | O_EXCL | O_CLOEXEC)
        try #require(holder >= 0)
        defer { close(holder) }
        let e = try #require(attemptWrite(try ImageSource(path: raw), on: card))
        #expect(e.code == .deviceBusy && e.message.contains("busy"))
    }

    @Test("a read-only card is 'write-protected'")
    func readOnlyDevice() throws {
        let raw = scratch.file("ro.raw")
        try write(patternBytes(1 << 20), to: raw)
        let card = try LoopCard(label: "ro", size: 8 << 20, options: .init(readOnly: true))
        defer { card.close() }
        let e = try #require(attemptWrite(try ImageSource(path: raw), on: card))
        #expect(e.code == .deviceReadOnly && e.message.contains("write-protected"))
    }

    @Test("a card pulled mid-write is 'card removed', never success")
    func cardPulledMidWrite() throws {
        let raw = scratch.file("p.raw")
        try write(patternBytes(24 << 20), to: raw)
        let card = try LoopCard(label: "pull", size: 32 << 20)
        defer { card.close() }
        try card.throttle(writeBytesPerSecond: 8 << 20)
        let pulled = CancellationFlag()
        var options = WriteOptions()
        options.verify = true
        let e: ImageIOError?
        do {
            _ = try ImageWriter.write(source: try ImageSource(path: raw), to: try WriteTarget.open(path: card.devicePath), options: options) { p in
                if p.bytesDone >= 4 << 20 && !pulled.isCancelled {
                    pulled.cancel()
                    try? card.pull()
                }
            }
            e = nil
        } catch { e = error }
        let error = try #require(e, "a write to a pulled card reported success")
        #expect(error.code == .deviceRemoved, "\(error)")
        #expect(error.message.contains("card removed"))
    }

    @Test("an I/O error names the offset where the card failed")
    func ioErrorAtOffset() throws {
        // The card's backing file lives on a 4 MiB tmpfs whose first 4 MiB are already
        // allocated: rewriting them works, the first write beyond fails (ENOSPC → EIO).
        let mountpoint = scratch.file("tiny")
        try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
        try run("mount", "-t", "tmpfs", "-o", "size=4m", "provision-test", mountpoint)
        defer { _ = try? run("umount", "-l", mountpoint) }
        let backing = mountpoint + "/provision-card-ioerr.img"
        _ = try? Command.run(["dd", "if=/dev/zero", "of=\(backing)", "bs=1M", "count=8"])
        try run("truncate", "-s", "16M", backing)
        let loop = try run("losetup", "--find", "--show", backing).trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = try? run("losetup", "-d", loop) }
        let raw = scratch.file("io.raw")
        try write(patternBytes(12 << 20), to: raw)
        var options = WriteOptions()
        options.chunkSize = 1 << 20
        do {
            _ = try ImageWriter.write(source: try ImageSource(path: raw), to: try WriteTarget.open(path: loop), options: options)
            Issue.record("a failing card reported success")
        } catch {
            #expect(error.code == .ioError, "\(error)")
            let at = try #require(error.offset)
            #expect(at >= 3 << 20 && at < 5 << 20, "failure offset \(at)")
            #expect(error.message.contains("I/O error at offset \(at)"))
        }
    }
}
