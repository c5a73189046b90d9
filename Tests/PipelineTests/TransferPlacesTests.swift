// provision_transfer_places: the capacity probe's single blocks, all in flight at once (Linux
// AIO), or one by one where AIO is refused. Checked on a real O_DIRECT loop device against
// `dd`'s view of it.

import Foundation
import ImageIO
import ProvisionCShims
import Testing
import TestSupport

/// Block `k` of the test: 4 KiB of bytes no other block has (its index in the first word).
private func pattern(_ k: Int) -> [UInt8] {
    var bytes = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ k &* 131 &+ 1) }
    withUnsafeBytes(of: UInt64(k).littleEndian) { for (i, b) in $0.enumerated() { bytes[i] = b } }
    return bytes
}

/// The card as `dd` reads it (O_DIRECT: not our descriptor, not the page cache).
private func readWithDD(_ device: String, bytes: Int) throws -> [UInt8] {
    let directory = try TemporaryDirectory("transfer-places")
    let file = directory.path + "/card"
    try Command.bash("dd if=\(device) of=\(file) bs=1M iflag=direct status=none")
    let data = try Data(contentsOf: URL(fileURLWithPath: file))
    #expect(data.count == bytes)
    return [UInt8](data)
}

private func transfer(_ fd: Int32, writing: Bool, _ offsets: [UInt64], _ buffer: AlignedBuffer, depth: Int32) -> (rc: Int32, failed: Int32, queued: Int32, errno: Int32) {
    let lengths = [UInt32](repeating: 4096, count: offsets.count)
    var failed: Int32 = -1, queued: Int32 = -1
    let rc = provision_transfer_places(fd, writing ? 1 : 0, offsets, lengths, Int32(offsets.count), buffer.bytes, depth, &failed, &queued)
    return (rc, failed, queued, errno)
}

@Suite("Places moved at once (AIO) or in turn", .serialized, .ownThread)
struct TransferPlacesTests {
    static let cardBytes: Int64 = 16 << 20

    /// 300 places spread over the card, in no order (every 4 KiB block at most once).
    static let places: [UInt64] = {
        var generator = SystemRandomNumberGenerator()
        let blocks = Array(0..<Int(cardBytes / 4096)).shuffled(using: &generator).prefix(300)
        return blocks.map { UInt64($0) * 4096 }
    }()

    @Test(arguments: [64, 8, 1] as [Int32])
    func writesAndReadsEveryPlaceAndNothingElse(depth: Int32) throws {
        let card = try LoopCard(label: "places-\(depth)", size: Self.cardBytes)
        defer { card.close() }
        let fd = open(card.devicePath, O_RDWR | provision_o_direct() | O_CLOEXEC)
        try #require(fd >= 0)
        defer { close(fd) }
        let places = Self.places
        let out = AlignedBuffer(capacity: places.count * 4096, alignment: 4096)
        for k in places.indices { pattern(k).withUnsafeBytes { (out.bytes + k * 4096).copyMemory(from: $0.baseAddress!, byteCount: 4096) } }

        let wrote = transfer(fd, writing: true, places, out, depth: depth)
        #expect(wrote.rc == 0, "errno \(wrote.errno) at place \(wrote.failed)")
        // Depth 1 goes in turn; any other through AIO, all of it (8: a few rounds of 8 in flight).
        #expect(wrote.queued == (depth > 1 ? Int32(places.count) : 0))
        try #require(fsync(fd) == 0)

        var card0 = try readWithDD(card.devicePath, bytes: Int(Self.cardBytes))
        var wrong: [Int] = []
        for (k, p) in places.enumerated() {
            if Array(card0[Int(p)..<Int(p) + 4096]) != pattern(k) { wrong.append(k) }
            card0.replaceSubrange(Int(p)..<Int(p) + 4096, with: repeatElement(0, count: 4096))
        }
        #expect(wrong.isEmpty, "\(wrong.count) places hold other bytes than were written there, the first at byte \(wrong.first.map { places[$0] } ?? 0)")
        let outside = card0.firstIndex { $0 != 0 }
        #expect(outside == nil, "byte \(outside ?? 0), outside the places, was written")

        let back = AlignedBuffer(capacity: places.count * 4096, alignment: 4096)
        let read = transfer(fd, writing: false, places, back, depth: depth)
        #expect(read.rc == 0 && read.queued == (depth > 1 ? Int32(places.count) : 0))
        #expect(memcmp(back.bytes, out.bytes, places.count * 4096) == 0, "read back other bytes than were written")
    }

    @Test(arguments: [256, 1] as [Int32])
    func aPlaceTheDeviceRefusesIsNamedAndTheOnesBeforeItGo(depth: Int32) throws {
        let card = try LoopCard(label: "places-end-\(depth)", size: 8 << 20)
        defer { card.close() }
        let fd = open(card.devicePath, O_RDWR | provision_o_direct() | O_CLOEXEC)
        try #require(fd >= 0)
        defer { close(fd) }
        // Places 5 and 7 lie past the end of the card: the lower one is named.
        let places: [UInt64] = [0, 4096, 1 << 20, 2 << 20, 3 << 20, 8 << 20, 4 << 20, 9 << 20]
        let out = AlignedBuffer(capacity: places.count * 4096, alignment: 4096)
        for k in places.indices { pattern(k).withUnsafeBytes { (out.bytes + k * 4096).copyMemory(from: $0.baseAddress!, byteCount: 4096) } }
        let wrote = transfer(fd, writing: true, places, out, depth: depth)
        #expect(wrote.rc == -1 && wrote.failed == 5, "rc \(wrote.rc), failed \(wrote.failed)")
        #expect(wrote.errno != 0)
        let read = transfer(fd, writing: false, places, out, depth: depth)
        #expect(read.rc == -1 && read.failed == 5, "rc \(read.rc), failed \(read.failed)")
        let card0 = try readWithDD(card.devicePath, bytes: 8 << 20)
        for k in 0..<5 {
            let same = Array(card0[Int(places[k])..<Int(places[k]) + 4096]) == pattern(k)
            #expect(same, "place \(k) holds other bytes than were written there")
        }
    }

    @Test func leavesNoAIOContextBehind() throws {
        let card = try LoopCard(label: "places-leak", size: 8 << 20)
        defer { card.close() }
        let fd = open(card.devicePath, O_RDWR | provision_o_direct() | O_CLOEXEC)
        try #require(fd >= 0)
        defer { close(fd) }
        // Every AIO context is a mapping of its own ("/[aio]") until io_destroy; the calls keep
        // theirs for the next call.
        func contexts() throws -> Int {
            try String(contentsOfFile: "/proc/self/maps", encoding: .utf8).split(separator: "\n").filter { $0.contains("/[aio]") }.count
        }
        let before = try contexts()
        let places: [UInt64] = (0..<16).map { UInt64($0) << 19 }
        let buffer = AlignedBuffer(capacity: (places.count + 1) * 4096, alignment: 4096)
        for round in 0..<200 {
            let r = transfer(fd, writing: round % 2 == 0, places, buffer, depth: 16)
            #expect(r.rc == 0 && r.queued == 16)
            // Failing ones too: the context goes on that ending as well.
            #expect(transfer(fd, writing: false, places + [8 << 20], buffer, depth: 16).rc == -1)
        }
        // One call at a time takes the one context the last left, whatever probes of other
        // suites keep meanwhile (a few); 400 calls that each made one would leave 400.
        let after = try contexts()
        #expect(after <= before + 8, "AIO contexts before: \(before), after 400 calls: \(after)")
    }
}
