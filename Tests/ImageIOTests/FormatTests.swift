import Foundation
@testable import ImageIO
import Testing
import TestSupport

/// Issue 17: the formats people get images in (bzip2, lz4, lzop, zip, tar and compressed
/// tars, through libarchive), what is refused before a byte is written, and file targets that
/// end up equal to the image. Every packed file is made by the real tool (bzip2, lz4, lzop,
/// zip, tar); every result is judged by `cmp` against the image.
@Suite("Image formats, refusals and file targets", .serialized, .ownThread)
struct FormatTests {
    let scratch: TemporaryDirectory
    init() throws { scratch = try TemporaryDirectory("provision-formats") }

    /// 12 MiB with data at 0, at 300 KiB, 3 MiB of random bytes at 5 MiB and a little near the
    /// end; holes elsewhere. Returns the image and its bmap (by bmaptool create).
    func sparseImage(_ name: String = "disk.img") throws -> (image: String, bmap: String) {
        let dir = scratch.file(UUID().uuidString.prefix(8).description)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let image = dir + "/" + name
        try run("truncate", "-s", "12M", image)
        let pieces: [(UInt64, [UInt8])] = [(0, patternBytes(64 << 10, seed: 1)), (300 << 10, patternBytes(8192, seed: 4)),
                                           (5 << 20, patternBytes(3 << 20, seed: 2)), (12 << 20 - 8192, patternBytes(4096, seed: 3))]
        let h = FileHandle(forUpdatingAtPath: image)!
        for (offset, bytes) in pieces { try h.seek(toOffset: offset); h.write(Data(bytes)) }
        try h.close()
        try run("bmaptool", "create", "-o", image + ".bmap", image)
        return (image, image + ".bmap")
    }

    /// Packs `image` with the real tool; the result is named `packed.bin` so only its bytes
    /// can tell what it is.
    func pack(_ image: String, as kind: String) throws -> String {
        let dir = (image as NSString).deletingLastPathComponent
        let name = (image as NSString).lastPathComponent
        let out = dir + "/packed-\(kind).bin"
        switch kind {
        case "bz2": try Command.check(["bash", "-c", "bzip2 -c '\(image)' > '\(out)'"])
        case "lz4": try run("lz4", "-q", "-f", image, out)
        case "lzo": try run("lzop", "-f", "-o", out, image)
        case "zip":
            // With side files, as release zips come: only the image is a candidate.
            try "see the wiki\n".write(toFile: dir + "/README.txt", atomically: true, encoding: .utf8)
            try Command.check(["bash", "-c", "cd '\(dir)' && zip -q '\(out).zip' '\(name)' README.txt '\(name).bmap' && mv '\(out).zip' '\(out)'"])
        case "tar": try run("tar", "-C", dir, "-cf", out, name)
        case "tar.gz": try run("tar", "-C", dir, "-czf", out, name)
        case "tar.xz": try run("tar", "-C", dir, "-cJf", out, name)
        case "tar.zst": try run("tar", "-C", dir, "--zstd", "-cf", out, name)
        case "tar.bz2": try run("tar", "-C", dir, "-cjf", out, name)
        default: Issue.record("unknown kind \(kind)")
        }
        return out
    }

    /// A file target that already holds other bytes: what the image leaves unwritten must
    /// not keep them.
    func staleTarget(_ name: String) throws -> String {
        let path = scratch.file(name)
        try write([UInt8](repeating: 0xAA, count: 20 << 20), to: path)
        return path
    }

    func writeFile(_ source: ImageSource, to path: String, bmap: String? = nil) throws(ImageIOError) -> WriteResult {
        var options = WriteOptions()
        if let bmap { options.bmap = try Bmap.load(path: bmap) }
        let target = try WriteTarget.open(path: path)
        defer { target.close() }
        return try ImageWriter.write(source: source, to: target, options: options)
    }

    static let kinds = ["bz2", "lz4", "lzo", "zip", "tar", "tar.gz", "tar.xz", "tar.zst", "tar.bz2"]
    static let names: [String: String] = ["bz2": "bzip2", "lz4": "lz4", "lzo": "lzop", "zip": "zip", "tar": "tar",
                                          "tar.gz": "tar.gzip", "tar.xz": "tar.xz", "tar.zst": "tar.zstd", "tar.bz2": "tar.bzip2"]

    @Test("each format is told by its bytes and lands byte-exact, with and without a bmap", arguments: kinds)
    func byteExact(kind: String) throws {
        let (image, bmap) = try sparseImage()
        let packed = try pack(image, as: kind)
        for useBmap in [false, true] {
            let source = try ImageSource(path: packed)
            #expect(source.formatName == Self.names[kind])
            let target = try staleTarget("out-\(kind)-\(useBmap).img")
            let result = try writeFile(source, to: target, bmap: useBmap ? bmap : nil)
            #expect(result.verified)
            #expect(result.imageFormat == source.format.rawValue)
            #expect(try Command.run(["cmp", image, target]).succeeded, "\(kind) bmap=\(useBmap): the file differs from the image")
        }
    }

    @Test("pzstd's files, a skippable frame first, are zstd: written byte-exact, not raw")
    func pzstdIsZstd() throws {
        let (image, bmap) = try sparseImage()
        let packed = scratch.file("packed-pzstd.bin")
        try run("pzstd", "-q", "-f", "-p", "2", image, "-o", packed)
        let head = try readBytes(packed, count: 4)
        #expect((0x50...0x5F).contains(head[0]) && Array(head[1...]) == [0x2A, 0x4D, 0x18], "the premise: a skippable frame first")
        for useBmap in [false, true] {
            let source = try ImageSource(path: packed)
            #expect(source.format == .zstd)
            #expect(source.uncompressedSizeHint == nil, "the first frame declares nothing of the rest")
            let target = try staleTarget("out-pzstd-\(useBmap).img")
            #expect(try writeFile(source, to: target, bmap: useBmap ? bmap : nil).verified)
            #expect(try Command.run(["cmp", image, target]).succeeded, "pzstd bmap=\(useBmap): the file differs from the image")
        }
    }

    @Test("an .xz whose dictionary needs more memory than a decoder is given is refused before it is allocated, saying how much it needs")
    func xzNeedingTooMuchMemory() throws {
        let (image, _) = try sparseImage()
        let packed = scratch.file("bigdict.xz")
        // From a pipe, so xz does not shrink the dictionary to the input's size.
        try Command.check(["bash", "-c", "cat '\(image)' | xz --lzma2=preset=1,dict=192MiB -c > '\(packed)'"])
        let listed = try run("xz", "--robot", "-lvv", packed)
        let needed = listed.split(separator: "\n").first { $0.hasPrefix("summary") }?.split(separator: "\t")[1]
        #expect(needed.flatMap { UInt64($0) }.map { $0 > 128 << 20 } == true, "the premise, by xz: \(listed)")
        let target = try staleTarget("out-bigdict.img")
        let error = try #require(throws: ImageIOError.self) { try writeFile(try ImageSource(path: packed), to: target) }
        #expect(error.code == .unsupportedFormat && error.message.contains("MiB of memory to decode") && error.message.contains("more than the 128 MiB"), "\(error)")
    }

    @Test("a truncated file says 'truncated' and names its format, with and without a bmap", arguments: kinds + ["gz", "xz", "zst"])
    func truncated(kind: String) throws {
        let (image, bmap) = try sparseImage()
        let packed: String
        switch kind {
        case "gz", "xz", "zst": packed = try compress(image, kind)
        default: packed = try pack(image, as: kind)
        }
        // Cut inside the random 3 MiB at 5 MiB, which is mapped.
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: packed)))
        let cut = scratch.file("cut-\(kind.replacingOccurrences(of: ".", with: "-")).bin")
        try write(Array(bytes.prefix(bytes.count * 6 / 10)), to: cut)
        for useBmap in [false, true] {
            let failure: ImageIOError
            do {
                let source = try ImageSource(path: cut)
                _ = try writeFile(source, to: scratch.file("cut-out.img"), bmap: useBmap ? bmap : nil)
                Issue.record("\(kind) bmap=\(useBmap): a truncated image was written without complaint")
                continue
            } catch { failure = error }
            #expect(failure.code == .compressedStreamTruncated, "\(kind) bmap=\(useBmap): \(failure)")
            #expect(failure.message.contains("truncated"), "\(failure)")
            let name = ["gz": "gzip", "xz": "xz", "zst": "zstd"][kind] ?? Self.names[kind]!
            #expect(failure.message.contains(name + " "), "\(kind): \(failure)")
        }
    }

    @Test("a damaged file says 'corrupt' and names its format", arguments: ["bz2", "lz4", "lzo", "zip", "tar", "tar.gz", "tar.bz2"])
    func corrupt(kind: String) throws {
        let (image, _) = try sparseImage()
        let packed = try pack(image, as: kind)
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: packed)))
        if kind == "tar" {
            // A plain tar has no checksum of its data; its header has one.
            bytes[20] ^= 0xFF
        } else {
            // The middle of the compressed file: inside the random 3 MiB, stored as it is.
            for i in 0..<64 { bytes[bytes.count / 2 + i * 97] ^= 0x5A }
        }
        let damaged = scratch.file("damaged-\(kind.replacingOccurrences(of: ".", with: "-")).bin")
        try write(bytes, to: damaged)
        let failure: ImageIOError
        do {
            _ = try writeFile(try ImageSource(path: damaged), to: scratch.file("damaged-out.img"))
            Issue.record("\(kind): a damaged image was written without complaint")
            return
        } catch { failure = error }
        #expect(failure.code == .compressedStreamCorrupt, "\(kind): \(failure)")
        #expect(failure.message.contains("corrupt") && failure.message.contains(Self.names[kind]! + " "), "\(kind): \(failure)")
    }

    @Test("an archive with two images is refused, naming both")
    func severalImagesRefused() throws {
        let (image, _) = try sparseImage("a.img")
        let dir = (image as NSString).deletingLastPathComponent
        try FileManager.default.copyItem(atPath: image, toPath: dir + "/b.img")
        try Command.check(["bash", "-c", "cd '\(dir)' && zip -q two.zip a.img b.img && tar -czf two.tar.gz a.img b.img"])
        // zip: its directory is read before anything is written.
        #expect {
            _ = try ImageSource(path: dir + "/two.zip")
        } throws: { error in
            let e = error as? ImageIOError
            return e?.code == .unsupportedFormat && e!.message.contains("a.img") && e!.message.contains("b.img")
        }
        // A compressed tar is read once: the second image is found after the first, and the
        // write fails (the first MiB, held back, was never written).
        let target = try staleTarget("two-out.img")
        #expect {
            _ = try writeFile(try ImageSource(path: dir + "/two.tar.gz"), to: target)
        } throws: { error in
            let e = error as? ImageIOError
            return e?.code == .unsupportedFormat && e!.message.contains("a.img") && e!.message.contains("b.img")
        }
    }

    @Test("formats provision does not write are refused by name, before anything is written; --raw writes them as they are",
          arguments: ["7z", "qcow2", "vmdk", "vdi", "vhdx", "rar", "dmg", "android-sparse", "xz-qcow2"])
    func refusesOtherFormats(kind: String) throws {
        let (image, _) = try sparseImage()
        let dir = (image as NSString).deletingLastPathComponent
        let out = dir + "/other-\(kind).bin"
        switch kind {
        case "7z": try run("7z", "a", "-bd", "-y", out + ".7z", image); try FileManager.default.moveItem(atPath: out + ".7z", toPath: out)
        case "qcow2", "vmdk", "vdi", "vhdx": try run("qemu-img", "convert", "-O", kind, image, out)
        case "xz-qcow2":
            try run("qemu-img", "convert", "-O", "qcow2", image, dir + "/inner.qcow2")
            try Command.check(["bash", "-c", "xz -0 -c '\(dir)/inner.qcow2' > '\(out)'"])
        case "rar":
            // No free RAR writer exists; its signature and a body are what a reader sees first.
            try write(Array("Rar!\u{1A}\u{07}\u{01}\u{00}".utf8) + patternBytes(64 << 10), to: out)
        case "dmg":
            // An Apple disk image ends with a 512-byte "koly" trailer.
            try write(patternBytes(64 << 10) + Array("koly".utf8) + [UInt8](repeating: 0, count: 508), to: out)
        default:
            // Android sparse: magic ed26ff3a (little-endian), then a header.
            try write([0x3A, 0xFF, 0x26, 0xED, 1, 0, 0, 0, 28, 0, 12, 0] + patternBytes(64 << 10), to: out)
        }
        let names = ["7z": "7-Zip", "qcow2": "qcow2", "vmdk": "VMDK", "vdi": "VDI", "vhdx": "VHDX", "rar": "RAR",
                     "dmg": "Apple disk image", "android-sparse": "Android sparse", "xz-qcow2": "xz-compressed QEMU qcow2"]
        #expect {
            _ = try ImageSource(path: out)
        } throws: { error in
            let e = error as? ImageIOError
            return e?.code == .unsupportedFormat && e!.message.contains(names[kind]!) && e!.message.contains("Nothing was written")
        }
        let forced = try ImageSource(path: out, forceRaw: true)
        #expect(forced.format == .raw)
        let target = try staleTarget("forced-\(kind).img")
        _ = try writeFile(forced, to: target)
        #expect(try Command.run(["cmp", out, target]).succeeded)
    }

    @Test("a file target equals the image after any write: emptied first, holes kept as holes", arguments: ["raw", "zst"])
    func fileTargetEqualsImage(format: String) throws {
        let (image, bmap) = try sparseImage()
        let input = format == "raw" ? image : try compress(image, format)
        for useBmap in [false, true] {
            let target = try staleTarget("equal-\(format)-\(useBmap).img")
            _ = try writeFile(try ImageSource(path: input), to: target, bmap: useBmap ? bmap : nil)
            #expect(try Command.run(["cmp", image, target]).succeeded, "bmap=\(useBmap)")
            // 12 MiB long, about 3.1 MiB of it data: the zeros were not written.
            var st = stat()
            #expect(stat(target, &st) == 0)
            #expect(st.st_size == 12 << 20)
            #expect(UInt64(st.st_blocks) * 512 < 4 << 20, "allocated \(st.st_blocks * 512) bytes: holes were filled")
        }
    }

    @Test("writing an image file onto itself is refused and leaves it whole")
    func refusesImageAsItsOwnTarget() throws {
        let (image, _) = try sparseImage()
        let before = try run("sha256sum", image)
        #expect {
            _ = try writeFile(try ImageSource(path: image), to: image)
        } throws: { error in
            (error as? ImageIOError)?.code == .invalidArgument
        }
        #expect(try run("sha256sum", image) == before)
    }
}

/// The first MiB of the card (partition table, a boot loader at 300 KiB) is written only
/// after all the rest is on the card: a failure later leaves it as it was.
@Suite("The first MiB is held back", .serialized)
struct HeadHeldBackTests {
    let scratch: TemporaryDirectory
    init() throws { scratch = try TemporaryDirectory("provision-head") }

    @Test("with a bmap: a mapped range at 300 KiB is untouched when a later range fails its check")
    func bmapHeadUntouchedOnFailure() throws {
        let image = scratch.file("head.img")
        try run("truncate", "-s", "8M", image)
        let h = FileHandle(forUpdatingAtPath: image)!
        for (offset, seed) in [(UInt64(0), UInt64(1)), (300 << 10, 2), (700 << 10, 3), (4 << 20, 4)] {
            try h.seek(toOffset: offset)
            h.write(Data(patternBytes(16 << 10, seed: seed)))
        }
        try h.close()
        try run("bmaptool", "create", "-o", image + ".bmap", image)
        // Damage the range at 4 MiB after the bmap was made: its check fails mid-write.
        let d = FileHandle(forUpdatingAtPath: image)!
        try d.seek(toOffset: 4 << 20 + 100)
        d.write(Data([0x42, 0x43]))
        try d.close()

        let fill = scratch.file("fill.img")
        try write([UInt8](repeating: 0xAA, count: 16 << 20), to: fill)
        let card = try LoopCard(label: "head-bmap", size: 16 << 20, image: fill)
        defer { card.close() }
        var options = WriteOptions()
        options.bmap = try Bmap.load(path: image + ".bmap")
        let failure = try #require(attemptWrite(try ImageSource(path: image), on: card, options: options))
        #expect(failure.code == .imageCorrupt, "\(failure)")
        let untouched = [UInt8](repeating: 0xAA, count: 16 << 10)
        #expect(try readBytes(card.devicePath, offset: 0, count: 16 << 10) == untouched, "the partition table was written before the failure")
        #expect(try readBytes(card.devicePath, offset: 300 << 10, count: 16 << 10) == untouched, "the range at 300 KiB was written before the failure")
        #expect(try readBytes(card.devicePath, offset: 700 << 10, count: 16 << 10) == untouched, "the range at 700 KiB was written before the failure")
    }

    @Test("without a bmap: a truncated .gz leaves the first MiB as it was")
    func streamHeadUntouchedOnFailure() throws {
        let raw = scratch.file("stream.img")
        try write(patternBytes(6 << 20, seed: 9), to: raw)
        let gz = try compress(raw, "gz")
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: gz)))
        let cut = scratch.file("stream-cut.img.gz")
        try write(Array(bytes.prefix(bytes.count * 3 / 4)), to: cut)
        let fill = scratch.file("fill2.img")
        try write([UInt8](repeating: 0xAA, count: 16 << 20), to: fill)
        let card = try LoopCard(label: "head-stream", size: 16 << 20, image: fill)
        defer { card.close() }
        // 1 MiB chunks: those between 1 MiB and the cut are written before the failure.
        var options = WriteOptions()
        options.chunkSize = 1 << 20
        let failure = try #require(attemptWrite(try ImageSource(path: cut), on: card, options: options))
        #expect(failure.code == .compressedStreamTruncated, "\(failure)")
        #expect(try readBytes(card.devicePath, offset: 0, count: 1 << 20) == [UInt8](repeating: 0xAA, count: 1 << 20))
        // What came after the first MiB was written (the failure was later).
        #expect(try readBytes(card.devicePath, offset: 1 << 20, count: 4096) == Array(patternBytes(2 << 20, seed: 9)[(1 << 20)..<((1 << 20) + 4096)]))
    }
}
