// The capacity probe (issue 16) against cards that lie (FakeCard: a FUSE program of our
// own behind an O_DIRECT loop device) and honest loop cards.

import Foundation
import ImageIO
@testable import Pipeline
import Testing
import TestSupport

private func probe(_ device: String, pipedRuns: Int = CapacityProbe.pipedRuns) throws -> CapacityProbe.Result {
    let target = try WriteTarget.open(path: device)
    defer { target.close() }
    return try CapacityProbe.run(target, pipedRuns: pipedRuns)
}

/// The pipes (by inode) of `descriptors`.
private func pipeInodes(_ descriptors: [Int32]) -> Set<String> {
    Set(descriptors.map { fd in
        var st = stat()
        _ = fstat(fd, &st)
        return "pipe:[\(st.st_ino)]"
    })
}

/// Which of `pipes` some descriptor of this process still holds (other tests run beside this
/// one and open and close descriptors of their own: counting them would not do).
private func stillOpen(_ pipes: Set<String>) throws -> Set<String> {
    let fds = try FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")
    return Set(fds.compactMap { try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + $0) }).intersection(pipes)
}

/// Fills a card with random bytes through the device (O_DIRECT).
private func fillRandom(_ device: String, bytes: Int64) throws {
    try Command.bash("head -c \(bytes) /dev/urandom | dd of=\(device) bs=1M iflag=fullblock oflag=direct status=none")
}

@Suite("Capacity probe", .serialized, .ownThread)
struct CapacityProbeTests {
    @Test(arguments: [4 << 20, 8 << 20, 16 << 20, 32 << 20] as [Int64])
    func refusesACardThatWrapsWithItsRealSize(real: Int64) throws {
        let fake = try FakeCard(label: "wrap-\(real >> 20)m", claimedSize: 64 << 20, lie: .wraps(realSize: real))
        defer { fake.close() }
        let result = try probe(fake.devicePath)
        #expect(result.isCounterfeit)
        #expect(result.realBytes == UInt64(real))
        #expect(result.claimedBytes == 64 << 20)
    }

    @Test("a probe block whose header reads back intact but one byte of its pattern does not is not taken as kept")
    func aBlockWithOneWrongByteInItsPatternIsNotKept() throws {
        // Block 2 of the first window, past its 24-byte header (magic, nonce, offset).
        let at: Int64 = 2 * 4096 + 1000
        let fake = try FakeCard(label: "flip-pattern", claimedSize: 64 << 20, lie: .honest, flip: .always(at: at))
        defer { fake.close() }
        let result = try probe(fake.devicePath)
        let real = try #require(result.realBytes, "a card that returns another byte in a probe block passed")
        #expect(real <= UInt64(at), "estimated \(real)")
    }

    @Test("a probe block is only itself: not with a sector of another block, nor another probe's body, nor zeros")
    func aProbeBlockIsOnlyItself() {
        let block = 4096
        func session(_ nonce: UInt64) -> CapacityProbe.Session {
            CapacityProbe.Session(fd: -1, path: "/dev/null", block: block, nonce: nonce,
                                  buffer: AlignedBuffer(capacity: block, alignment: block), stash: CapacityProbe.Stash(directory: nil))
        }
        let probe = session(0x5EED_1234_ABCD_0001)
        let mine = UnsafeMutableRawPointer.allocate(byteCount: block, alignment: block)
        let other = UnsafeMutableRawPointer.allocate(byteCount: block, alignment: block)
        defer { mine.deallocate(); other.deallocate() }
        let a: UInt64 = 12 * 4096, b: UInt64 = 13 * 4096
        probe.fill(a, into: mine)
        #expect(probe.matches(a, mine))
        #expect(!probe.matches(b, mine), "block \(a) passed as block \(b)")
        // One 512-byte sector of block b in block a (a card mapping sectors, not blocks).
        for sector in 0..<(block / 512) {
            probe.fill(a, into: mine)
            probe.fill(b, into: other)
            (mine + sector * 512 + (sector == 0 ? 24 : 0)).copyMemory(from: other + sector * 512 + (sector == 0 ? 24 : 0), byteCount: sector == 0 ? 488 : 512)
            #expect(!probe.matches(a, mine), "block \(a) with sector \(sector) of block \(b) passed")
        }
        // An earlier probe's block at the same offset, its header made this probe's.
        session(0x5EED_1234_ABCD_0002).fill(a, into: other)
        probe.fill(a, into: mine)
        other.copyMemory(from: mine, byteCount: 24)
        #expect(!probe.matches(a, other))
        // Zeros after an intact header.
        probe.fill(a, into: mine)
        (mine + 24).initializeMemory(as: UInt8.self, repeating: 0, count: block - 24)
        #expect(!probe.matches(a, mine))
    }

    @Test(arguments: [8 << 20, 24 << 20, (40 << 20) + 12288, (52 << 20) + 4096, (3 << 20) + 8192] as [Int64])
    func refusesACardThatDropsWithItsRealSizeToAMegabyte(real: Int64) throws {
        let fake = try FakeCard(label: "drop-\(real >> 20)m", claimedSize: 64 << 20, lie: .drops(realSize: real))
        defer { fake.close() }
        let result = try probe(fake.devicePath)
        let estimate = try #require(result.realBytes)
        #expect(estimate >= UInt64(real) && estimate <= UInt64(real) + (1 << 20), "real \(real), estimated \(estimate)")
    }

    @Test func theRefusalSaysWhatTheCardClaimsAndStores() {
        let result = CapacityProbe.Result(claimedBytes: 64_000_000_000, realBytes: 8_000_000_000, blocks: 90, seconds: 0.1)
        #expect(result.refusal == "card claims 64.0 GB but stores about 8.0 GB: refused as counterfeit")
        #expect(CapacityProbe.Result(claimedBytes: 1, realBytes: nil, blocks: 1, seconds: 0).refusal == nil)
    }

    @Test(arguments: [1 << 20, 8 << 20, (24 << 20) + 4096, 100 << 20, 1 << 30] as [Int64])
    func passesAnHonestLoopCard(size: Int64) throws {
        let card = try LoopCard(label: "honest", size: size)
        defer { card.close() }
        let result = try probe(card.devicePath)
        #expect(result.realBytes == nil)
        #expect(result.claimedBytes == UInt64(size))
    }

    @Test func passesAnHonestFuseCard() throws {
        let fake = try FakeCard(label: "honest-fuse", claimedSize: 64 << 20, lie: .honest)
        defer { fake.close() }
        #expect(try probe(fake.devicePath).realBytes == nil)
    }

    /// A card whose controller counts modulo a size that is no power of two (the probe's
    /// wrap catchers and its first window, then the division down to the exact size).
    @Test(arguments: [(24 << 20) + 4096, (40 << 20) + 12288, 48 << 20, (60 << 20) + 8192, (3 << 20) + 4096] as [Int64])
    func refusesACardThatWrapsAtASizeNoPowerOfTwoWithItsRealSize(real: Int64) throws {
        let fake = try FakeCard(label: "wrap-odd-\(real >> 12)", claimedSize: 64 << 20, lie: .wraps(realSize: real))
        defer { fake.close() }
        let result = try probe(fake.devicePath)
        #expect(result.realBytes == UInt64(real), "real \(real), found \(result.realBytes.map(String.init) ?? "nothing")")
    }

    /// Positions cover 0, the end and every power of two.
    @Test func positionsIncludeTheEndAndEveryPowerOfTwo() {
        let size: UInt64 = 64_000_000_000
        let positions = CapacityProbe.positions(size: size, block: 4096)
        #expect(positions.contains(0))
        #expect(positions.contains(size / 4096 * 4096 - 4096))
        var p: UInt64 = 4096
        while p < size - 4096 { #expect(positions.contains(p)); p <<= 1 }
        #expect(positions == positions.sorted(by: >))
        #expect(Set(positions).count == positions.count)
        // Cheap on a big card too: about 2·√(size·block) bytes.
        #expect(positions.count * 4096 < 48 << 20, "\(positions.count) blocks")
    }

    /// The cover, checked by arithmetic alone: for every real size R (a multiple of the
    /// block) a wrapping card puts some probed offset p ≥ R onto p mod R, where the
    /// collision shows: inside the first window (written first, read back last), or on a
    /// single block below p that is written after p while p is read back.
    @Test(arguments: [(64 << 20, 1), (2 << 30, 4099), (64_000_000_000, 100_003)] as [(UInt64, UInt64)])
    func everyWrapSizeHasACollidingPair(size: UInt64, stride: UInt64) {
        let block: UInt64 = 4096
        let layout = CapacityProbe.layout(size: size, block: 4096)
        let singles = Set(layout.singles)
        var missed: [UInt64] = []
        var r = 2 * block
        while r < size / block * block - block {
            let caught = layout.singles.contains { p in
                p >= r && (p % r < layout.window || (!layout.catchers.contains(p) && singles.contains(p % r)))
            }
            if !caught { missed.append(r) }
            r += stride * block
        }
        #expect(missed.isEmpty, "wraps not caught at \(missed.prefix(5)) (of \(missed.count))")
    }

    /// With the window's first runs in pipes (the default) and without.
    @Test(arguments: [CapacityProbe.pipedRuns, 0])
    func restoresWhatItOverwroteByteForByte(pipedRuns: Int) throws {
        let card = try LoopCard(label: "restore", size: 48 << 20)
        defer { card.close() }
        try fillRandom(card.devicePath, bytes: 48 << 20)
        let before = try card.sha256()
        #expect(try probe(card.devicePath, pipedRuns: pipedRuns).realBytes == nil)
        #expect(try card.sha256() == before)
    }

    /// The window's first runs go into pipes straight from the card, and back onto it from
    /// there: as many as the stash may take, the rest the usual way.
    @Test func theStashKeepsTheFirstRunsInPipesAndPutsThemBack() throws {
        let card = try LoopCard(label: "stash-pipes", size: 8 << 20)
        defer { card.close() }
        try fillRandom(card.devicePath, bytes: 8 << 20)
        let firstTwo = "dd if=\(card.devicePath) bs=1M count=2 iflag=direct status=none | sha256sum"
        let before = try Command.bash(firstTwo).stdout
        let target = try WriteTarget.open(path: card.devicePath)
        defer { target.close() }
        let stash = CapacityProbe.Stash(directory: nil, pipedRuns: 2)
        #expect(stash.capture(from: target.fd, offset: 0, count: 1 << 20))
        #expect(stash.capture(from: target.fd, offset: 1 << 20, count: 1 << 20))
        #expect(!stash.capture(from: target.fd, offset: 2 << 20, count: 1 << 20), "a third pipe")
        #expect(stash.pipesHeld == 2 && stash.bytesInMemory == 0 && stash.runs.count == 2)
        let pipes = pipeInodes(stash.pipeDescriptors)
        #expect(try pipes.count == 2 && stillOpen(pipes) == pipes)
        // The pipes hold what the card held when they were filled, whatever it holds now.
        try Command.bash("dd if=/dev/zero of=\(card.devicePath) bs=1M count=3 oflag=direct status=none")
        let buffer = AlignedBuffer(capacity: 1 << 20, alignment: 4096)
        stash.writeBack([1, 0], to: target.fd, through: buffer.bytes, capacity: buffer.capacity)
        #expect(stash.pipesHeld == 0)
        #expect(try stillOpen(pipes).isEmpty, "a pipe written back stays open")
        #expect(try Command.bash(firstTwo).stdout == before)
        // The third MiB was never kept: still the zeros written over it.
        let third = try Command.bash("dd if=\(card.devicePath) bs=1M skip=2 count=1 iflag=direct status=none | tr -d '\\000' | wc -c").stdout
        #expect(third.trimmingCharacters(in: .whitespacesAndNewlines) == "0")
    }

    /// Pipes never written back go with the stash: emptied (`removeAll`) or dropped.
    @Test(arguments: [true, false])
    func theStashsPipesCloseWhenItEmptiesOrGoes(removeAll: Bool) throws {
        let card = try LoopCard(label: "stash-pipes-go", size: 4 << 20)
        defer { card.close() }
        let target = try WriteTarget.open(path: card.devicePath)
        defer { target.close() }
        var stash: CapacityProbe.Stash? = CapacityProbe.Stash(directory: nil, pipedRuns: 2)
        #expect(stash!.capture(from: target.fd, offset: 0, count: 1 << 20) && stash!.capture(from: target.fd, offset: 2 << 20, count: 1 << 20))
        let pipes = pipeInodes(stash!.pipeDescriptors)
        #expect(try pipes.count == 2 && stillOpen(pipes) == pipes)
        if removeAll { stash!.removeAll() } else { stash = nil }
        #expect(try stillOpen(pipes).isEmpty)
        _ = stash
    }

    /// What the packaged daemon (no CAP_SYS_ADMIN, no CAP_SYS_RESOURCE) may keep in pipes:
    /// what the user's pipe quota leaves once every slot's writer has its 1 MiB pipe.
    @Test func pipesForTheProbeStayWithinThePipeQuota() throws {
        let soft = Int(try String(contentsOfFile: "/proc/sys/fs/pipe-user-pages-soft", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines))!
        // This process's own: with CAP_SYS_ADMIN (21) or CAP_SYS_RESOURCE (24) no quota holds it.
        let status = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
        let effective = UInt64(status.split(separator: "\n").first { $0.hasPrefix("CapEff:") }!.split(separator: "\t").last!, radix: 16)!
        if effective & (1 << 21 | 1 << 24) != 0 { #expect(CapacityProbe.pipedRuns(slots: 64) == CapacityProbe.pipedRuns) }
        let unprivileged = try withoutCapability(capSysAdmin) {
            try withoutCapability(capSysResource) { [4, 8, 32, 48, 64].map { CapacityProbe.pipedRuns(slots: $0) } }
        }
        // A pipe of 1 MiB is that many pages; the writers' pipes first.
        let pages = (1 << 20) / Int(getpagesize())
        let expected = [4, 8, 32, 48, 64].map { slots in soft == 0 ? 2 : min(2, max(0, (soft - slots * pages) / (slots * pages))) }
        #expect(unprivileged == expected)
        if soft == 16384 && pages == 256 { #expect(unprivileged == [2, 2, 1, 0, 0]) }
    }

    /// After a passed probe what the image overwrites next is left to it; the rest is restored.
    @Test func restoresOutsideTheImageOnlyWhenItPasses() throws {
        let card = try LoopCard(label: "restore-outside", size: 48 << 20)
        defer { card.close() }
        try fillRandom(card.devicePath, bytes: 48 << 20)
        let tail = "dd if=\(card.devicePath) bs=1M skip=8 iflag=direct status=none | sha256sum"
        let before = try Command.bash(tail).stdout
        let target = try WriteTarget.open(path: card.devicePath)
        defer { target.close() }
        #expect(try CapacityProbe.run(target, overwritten: [0..<(8 << 20)]).realBytes == nil)
        #expect(try Command.bash(tail).stdout == before)
    }

    /// A station's probe (issue 18): its buffer comes from the budget and goes back, and what
    /// it overwrote waits in an unlinked file, not in memory; the card is restored all the same.
    @Test(arguments: [0, CapacityProbe.pipedRuns])
    func onAStationsBudgetKeepsWhatItOverwroteInAFile(pipedRuns: Int) throws {
        let fake = try FakeCard(label: "restore-budget", claimedSize: 64 << 20, lie: .wraps(realSize: 16 << 20))
        defer { fake.close() }
        try fillRandom(fake.devicePath, bytes: 64 << 20)
        let before = try fake.card.sha256()
        let stash = try TemporaryDirectory("probe-stash")
        let budget = BufferBudget(limit: 4 << 20)
        let target = try WriteTarget.open(path: fake.devicePath)
        defer { target.close() }
        #expect(try CapacityProbe.run(target, budget: budget, stashDirectory: stash.path, pipedRuns: pipedRuns).isCounterfeit)
        #expect(try fake.card.sha256() == before)
        let usage = budget.usage
        #expect(usage.handedOut == 0 && usage.peakAllocated == CapacityProbe.runBytes, "\(usage)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: stash.path).isEmpty, "the stash file has no name")
    }

    @Test func theStashKeepsRunsInItsFileAndFallsBackToMemory() throws {
        let directory = try TemporaryDirectory("probe-stash")
        let notADirectory = directory.path + "/file"
        FileManager.default.createFile(atPath: notADirectory, contents: Data())
        for (place, inFile) in [(directory.path as String?, true), (notADirectory, false), (nil, false)] {
            let stash = CapacityProbe.Stash(directory: place)
            #expect(stash.usesFile == inFile)
            let runs: [(UInt64, [UInt8])] = [(0, [UInt8](repeating: 7, count: 4096)), (1 << 20, (0..<8192).map { UInt8($0 % 251) }), (4096, [1, 2, 3])]
            for (offset, bytes) in runs { try bytes.withUnsafeBytes { try stash.keep($0, from: offset) } }
            // Three single blocks kept in one piece, as the probe keeps them.
            let blocks: [(UInt64, [UInt8])] = [(64 << 20, [UInt8](repeating: 9, count: 512)), (8 << 20, [UInt8](repeating: 5, count: 512)),
                                               (32 << 20, (0..<512).map { UInt8($0 % 253) })]
            try blocks.flatMap(\.1).withUnsafeBytes { try stash.keep($0, runs: blocks.map { ($0.0, $0.1.count) }) }
            #expect(stash.bytesInMemory == (inFile ? 0 : 4096 + 8192 + 3 + 3 * 512))
            for (i, (offset, bytes)) in runs.enumerated().reversed() {
                var back = [UInt8](repeating: 0, count: bytes.count)
                #expect(back.withUnsafeMutableBytes { stash.load([i], into: $0.baseAddress!) })
                #expect(back == bytes && stash.runs[i].offset == offset)
            }
            for (i, (offset, bytes)) in blocks.enumerated() {
                var back = [UInt8](repeating: 0, count: bytes.count)
                #expect(back.withUnsafeMutableBytes { stash.load([runs.count + i], into: $0.baseAddress!) })
                #expect(back == bytes && stash.runs[runs.count + i].offset == offset)
            }
            if inFile {
                // Side by side in the file: read back in one piece.
                var back = [UInt8](repeating: 0, count: 3 * 512)
                #expect(back.withUnsafeMutableBytes { stash.load([3, 4, 5], into: $0.baseAddress!) })
                #expect(back == blocks.flatMap(\.1))
            }
            stash.removeAll()
            #expect(stash.runs.isEmpty && stash.bytesInMemory == 0)
        }
    }

    @Test(arguments: [FakeCard.Lie.wraps(realSize: 16 << 20), .wraps(realSize: (40 << 20) + 12288), .drops(realSize: 20 << 20)], [0, CapacityProbe.pipedRuns])
    func restoresAFakeCardItRefused(lie: FakeCard.Lie, pipedRuns: Int) throws {
        let fake = try FakeCard(label: "restore-fake", claimedSize: 64 << 20, lie: lie)
        defer { fake.close() }
        try fillRandom(fake.devicePath, bytes: 64 << 20)
        let before = try fake.card.sha256()
        #expect(try probe(fake.devicePath, pipedRuns: pipedRuns).isCounterfeit)
        #expect(try fake.card.sha256() == before)
    }
}
