import Foundation
@testable import ImageIO
import TestSupport


func write(_ bytes: [UInt8], to path: String) throws {
    try Data(bytes).write(to: URL(fileURLWithPath: path))
}

/// Reads `count` bytes at `offset` of a file or device (buffered; the device cache is
/// dropped first so the bytes come from the medium).
func readBytes(_ path: String, offset: UInt64 = 0, count: Int) throws -> [UInt8] {
    _ = try? run("blockdev", "--flushbufs", path)
    let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
    defer { try? h.close() }
    try h.seek(toOffset: offset)
    return Array(h.readData(ofLength: count))
}

@discardableResult
func run(_ args: String...) throws -> String {
    let r = try Command.run(args)
    guard r.succeeded else { throw FixtureError(r.description) }
    return r.stdout
}

struct FixtureError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// Writes `source` to `card`: the write's error, or nil if it succeeded. The target is closed
/// when this returns, so the next attempt on the same card does not find it busy.
func attemptWrite(_ source: ImageSource, on card: LoopCard, options: WriteOptions = WriteOptions()) -> ImageIOError? {
    do {
        let target = try WriteTarget.open(path: card.devicePath)
        defer { target.close() }
        _ = try ImageWriter.write(source: source, to: target, options: options)
        return nil
    } catch { return error }
}

/// Compresses `raw` with the real tool for `format` (gz, xz, zst); returns the new file's path.
func compress(_ raw: String, _ format: String) throws -> String {
    switch format {
    case "gz": try run("gzip", "-k", "-f", raw); return raw + ".gz"
    case "xz": try run("xz", "-k", "-f", "-0", raw); return raw + ".xz"
    default: try run("zstd", "-q", "-f", raw, "-o", raw + ".zst"); return raw + ".zst"
    }
}

/// The blocks of a one-frame .zst file as RFC 8878 lays them out: each block's header offset,
/// type (0 raw, 1 RLE, 2 compressed) and decoded size. Walked here, not by libzstd, so a test
/// can damage one block and know which.
func zstdBlocks(_ bytes: [UInt8]) -> [(offset: Int, type: Int, size: Int)] {
    let descriptor = bytes[4]
    let singleSegment = descriptor & 0x20 != 0
    let contentSizeBytes = [singleSegment ? 1 : 0, 2, 4, 8][Int(descriptor >> 6)]
    var at = 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][Int(descriptor & 3)] + contentSizeBytes
    var blocks: [(offset: Int, type: Int, size: Int)] = []
    while at + 3 <= bytes.count {
        let header = Int(bytes[at]) | Int(bytes[at + 1]) << 8 | Int(bytes[at + 2]) << 16
        let type = (header >> 1) & 3
        blocks.append((at, type, header >> 3))
        if header & 1 == 1 { break }  // the last block
        at += 3 + (type == 1 ? 1 : header >> 3)
    }
    return blocks
}
