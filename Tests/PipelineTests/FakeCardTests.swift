// The FakeCard fixture itself: the probe's and the repair's tests rely on it lying exactly
// as it says, through a loop device and with no cache answering for it.

import Foundation
import Testing
import TestSupport

/// Writes `bytes` at `offset` of `device` with O_DIRECT (dd), whole 4 KiB blocks.
func writeBlock(_ device: String, offset: Int64, byte: UInt8) throws {
    try Command.bash("printf '\\x\(String(format: "%02x", byte))%.0s' $(seq 4096) | dd of=\(device) bs=4096 seek=\(offset / 4096) count=1 oflag=direct conv=notrunc status=none")
}

/// The first byte of the 4 KiB block at `offset`, read with O_DIRECT.
func readFirstByte(_ device: String, offset: Int64) throws -> UInt8 {
    let out = try Command.bash("dd if=\(device) bs=4096 skip=\(offset / 4096) count=1 iflag=direct status=none | od -An -tu1 -N1")
    guard let value = UInt8(out.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) else {
        throw FixtureError(description: "unreadable od output: \(out.stdout)")
    }
    return value
}

struct FixtureError: Error, CustomStringConvertible {
    let description: String
}

/// The byte at `offset`, read with O_DIRECT in its 4 KiB block.
func readByte(_ device: String, at offset: Int64) throws -> UInt8 {
    let out = try Command.bash("dd if=\(device) bs=4096 skip=\(offset / 4096) count=1 iflag=direct status=none | od -An -tu1 -j\(offset % 4096) -N1")
    guard let value = UInt8(out.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) else {
        throw FixtureError(description: "unreadable od output: \(out.stdout)")
    }
    return value
}

@Suite("FakeCard fixture", .serialized)
struct FakeCardTests {
    @Test func wrapsWritesPastItsRealSizeOntoEarlierOffsets() throws {
        let fake = try FakeCard(label: "wrap", claimedSize: 64 << 20, lie: .wraps(realSize: 8 << 20))
        defer { fake.close() }
        #expect(fake.card.deviceSize == 64 << 20)
        try writeBlock(fake.devicePath, offset: 4096, byte: 0x11)
        try writeBlock(fake.devicePath, offset: (8 << 20) + 4096, byte: 0x22)
        // The second write landed on the first.
        #expect(try readFirstByte(fake.devicePath, offset: 4096) == 0x22)
        #expect(try readFirstByte(fake.devicePath, offset: (24 << 20) + 4096) == 0x22)
    }

    @Test func dropsWritesPastItsRealSizeAndReadsZeros() throws {
        let fake = try FakeCard(label: "drop", claimedSize: 64 << 20, lie: .drops(realSize: 24 << 20))
        defer { fake.close() }
        try writeBlock(fake.devicePath, offset: (24 << 20) - 4096, byte: 0x33)
        try writeBlock(fake.devicePath, offset: 24 << 20, byte: 0x44)
        #expect(try readFirstByte(fake.devicePath, offset: (24 << 20) - 4096) == 0x33)
        #expect(try readFirstByte(fake.devicePath, offset: 24 << 20) == 0)
        #expect(try readFirstByte(fake.devicePath, offset: 0) == 0)
    }

    @Test func flipsAByteOnTheFirstReadOnlyOrOnEveryRead() throws {
        // Mid-card, in a block of its own: udevd's blkid probe after each write (the watch
        // rule) reads the card's start and end, and must not spend the one flip.
        let at: Int64 = (9 << 20) + 12345
        let block = at / 4096 * 4096
        let once = try FakeCard(label: "flip-once", claimedSize: 16 << 20, lie: .honest, flip: .once(at: at))
        defer { once.close() }
        // Unwritten: no flip yet (a probe of the card before the write must not spend it).
        #expect(try readByte(once.devicePath, at: at) == 0)
        try writeBlock(once.devicePath, offset: block, byte: 0x0F)
        #expect(try readByte(once.devicePath, at: at) == 0xF0)
        #expect(try readByte(once.devicePath, at: at) == 0x0F)

        let always = try FakeCard(label: "flip-always", claimedSize: 16 << 20, lie: .honest, flip: .always(at: at))
        defer { always.close() }
        try writeBlock(always.devicePath, offset: block, byte: 0x0F)
        #expect(try readByte(always.devicePath, at: at) == 0xF0)
        #expect(try readByte(always.devicePath, at: at) == 0xF0)
        #expect(try readByte(always.devicePath, at: at + 1) == 0x0F)
    }

    @Test func closingUnmountsAndDetaches() throws {
        let fake = try FakeCard(label: "close", claimedSize: 8 << 20, lie: .drops(realSize: 4 << 20))
        let backing = fake.card.backingFile
        let mounts = { (try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? "" }
        let mountPoint = URL(fileURLWithPath: backing).deletingLastPathComponent().path
        #expect(mounts().contains(mountPoint))
        fake.close()
        #expect(!fake.card.isAttached)
        #expect(!mounts().contains(mountPoint))
        #expect(!FileManager.default.fileExists(atPath: mountPoint))
    }
}
