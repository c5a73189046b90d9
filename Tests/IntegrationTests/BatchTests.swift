#if canImport(Glibc)
import Glibc
#endif
import ControlProtocol
import Foundation
import Testing
import TestSupport

/// Batch imaging with the real daemon (issue 7): one decompression shared by every card,
/// each card at its own speed, and a card that fails leaves the batch without disturbing
/// the others.
@Suite("Batch imaging", .serialized)
struct BatchTests {
    /// A 48 MiB sparse image with 24 MiB of data in three places, its bmap, and a .zst.
    func batchImage(_ bench: StationBench) throws -> String {
        let raw = bench.directory + "/batch.img"
        try Command.bash("""
            truncate -s 48M '\(raw)'
            for off in 0 20 40; do dd if=/dev/urandom of='\(raw)' bs=1M count=8 seek=$off conv=notrunc status=none; done
            bmaptool create -o '\(raw).bmap' '\(raw)' 2>/dev/null
            zstd -q -f '\(raw)' -o '\(raw).zst'
            """)
        return raw + ".zst"
    }

    /// Every slot writes the same image (each bench has its own cache directory).
    func writeBatchConfig(_ bench: StationBench, image: String, slots: [String]) throws {
        try bench.writeConfig(slots.map { StationBench.Slot(name: $0, image: image) })
    }

    func writingNotes(_ bench: StationBench) throws -> [String] {
        let out = try Command.check(["sqlite3", bench.ledgerPath, "SELECT message FROM jobEvent WHERE state = 'writing' ORDER BY jobId"])
        return out.stdout.split(separator: "\n").map(String.init)
    }

    func cacheFiles(_ bench: StationBench) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: bench.directory + "/cache")) ?? []).filter { $0.hasSuffix(".img") }
    }

    @Test("provision watch --until-idle returns when the batch is over, not before")
    func watchUntilIdleEndsWithTheBatch() throws {
        let bench = try StationBench()
        defer { bench.close() }
        let image = try batchImage(bench)
        try writeBatchConfig(bench, image: image, slots: ["S1", "S2", "S3"])
        var cards: [LoopCard] = []
        for (slot, speed) in [("S1", UInt64(6_000_000)), ("S2", 12_000_000), ("S3", 24_000_000)] {
            let card = try bench.card(slot: slot, size: 64 << 20)
            try card.throttle(writeBytesPerSecond: speed)
            cards.append(card)
        }
        try bench.startDaemon()
        let watch = try Command.run([DaemonProcess.cliBinary, "watch", "--until-idle", "--expect-jobs", "3", "--socket", bench.socketPath],
                                    timeout: .seconds(300))
        #expect(watch.status == 0, "\(watch)")
        // Over when it returned: every card done, none still running.
        let status = try bench.status()
        #expect(["S1", "S2", "S3"].allSatisfy { status.slot($0)?.job?.state == .done }, "\(status.slots.map { ($0.name, $0.job?.state) })")
        // A "done" line for each job that ended while it watched, once: a job done before the
        // watch connected (the fast card, on a loaded machine) is counted from its first
        // status and prints none.
        let done = watch.stdout.split(separator: "\n").filter { $0.contains(" done") }
        let jobs = done.compactMap { line -> Substring? in
            let words = line.split(separator: " ")
            return words.firstIndex(of: "job").flatMap { words.index(after: $0) < words.endIndex ? words[words.index(after: $0)] : nil }
        }
        #expect(!done.isEmpty && done.count <= 3 && Set(jobs).count == done.count, "\(watch.stdout)")
        _ = cards
    }

    @Test("provision watch --until-idle --expect-jobs counts jobs, not slots: two cards one after the other in one slot end it")
    func expectJobsCountsJobs() throws {
        let bench = try StationBench()
        defer { bench.close() }
        let image = try bench.image("small.img", bytes: 1 << 20)
        try bench.writeConfig([.init(name: "S1", image: image)])
        try bench.startDaemon()
        let ended = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var watch: CommandOutput?
        Thread {
            watch = try? Command.run([DaemonProcess.cliBinary, "watch", "--until-idle", "--expect-jobs", "2", "--socket", bench.socketPath],
                                     timeout: .seconds(120))
            ended.signal()
        }.start()
        let first = try bench.card(slot: "S1", size: 8 << 20)
        try bench.waitForStatus("the first card done") { $0.slot("S1")?.job?.state == .done }
        try first.pull()
        try bench.waitForStatus("S1 empty") { $0.slot("S1")?.device == nil }
        #expect(ended.wait(timeout: .now()) == .timedOut, "watch ended after one job of the two it expects")
        try bench.card(slot: "S1", size: 8 << 20)
        try bench.waitForStatus("the second card done") { $0.slot("S1")?.job?.state == .done }
        #expect(ended.wait(timeout: .now() + 60) == .success, "watch did not end after the second job")
        #expect(watch?.status == 0, "\(String(describing: watch))")
        // The first job's end is in its output only if the watch connected before it (on a
        // loaded machine it may come later and count that job from the status instead).
        #expect((watch?.stdout.split(separator: "\n").filter { $0.contains(" done") }.count ?? 0) >= 1, "\(watch?.stdout ?? "")")
    }

    @Test("a pulled card leaves the batch: it fails with 'card removed', the others finish, one decompression")
    func pulledCardLeavesBatch() throws {
        let bench = try StationBench()
        defer { bench.close() }
        let image = try batchImage(bench)
        try writeBatchConfig(bench, image: image, slots: ["S1", "S2", "S3"])
        let fast = try bench.card(slot: "S1", size: 64 << 20)
        let pulled = try bench.card(slot: "S2", size: 64 << 20)
        let slow = try bench.card(slot: "S3", size: 64 << 20)
        try pulled.throttle(writeBytesPerSecond: 3_000_000)
        try slow.throttle(writeBytesPerSecond: 8_000_000)
        try bench.startDaemon()
        try bench.waitForStatus("S2 writing") { ($0.slot("S2")?.job?.progress?.bytesDone ?? 0) > 2 << 20 }
        try pulled.pull()
        let status = try bench.waitForStatus("all three finished", timeout: .seconds(90)) { s in
            ["S1", "S2", "S3"].allSatisfy { s.slot($0)?.job?.state.isFinal == true } || s.slot("S2")?.job == nil
                && ["S1", "S3"].allSatisfy { s.slot($0)?.job?.state.isFinal == true }
        }
        #expect(status.slot("S1")?.job?.state == .done)
        #expect(status.slot("S3")?.job?.state == .done)
        let jobs = try bench.jobs()
        let s2 = try #require(jobs.first { $0.slot == "S2" })
        #expect(s2.state == .failed)
        #expect(s2.message?.contains("card removed") == true, "\(s2.message ?? "")")
        #expect(jobs.count == 3)
        // One decompression for the whole batch: one cache file, one job that started it.
        #expect(cacheFiles(bench).count == 1)
        let notes = try writingNotes(bench)
        #expect(notes.filter { $0.contains("once for every card") }.count == 1, "\(notes)")
        #expect(notes.filter { $0.contains("sharing") }.count == 2, "\(notes)")
        _ = fast
    }

    @Test("a card that reads back wrong once is repaired alone (issue 16); the others are done")
    func cardFailingVerificationFailsAlone() throws {
        let bench = try StationBench()
        defer { bench.close() }
        let image = try batchImage(bench)
        try writeBatchConfig(bench, image: image, slots: ["V1", "V2", "V3"])
        let a = try bench.card(slot: "V1", size: 64 << 20)
        let liar = try bench.card(slot: "V2", size: 64 << 20)
        let c = try bench.card(slot: "V3", size: 64 << 20)
        // Slow read-back on the liar so the test can alter it while it is being verified.
        try liar.throttle(writeBytesPerSecond: 20_000_000, readBytesPerSecond: 2_000_000)
        try bench.startDaemon()
        try bench.waitForStatus("V2 verifying") { $0.slot("V2")?.job?.state == .verifying }
        // The card "lies": a block in the last mapped range changes behind the daemon's back.
        let offset: UInt64 = 46 << 20
        let fd = open(liar.devicePath, O_RDWR | O_CLOEXEC)
        try #require(fd >= 0)
        // Every byte inverted: a fixed pattern matched the random image's byte at the offset
        // once in 256 runs, and the first differing byte was then a later one.
        let original = try FileHandle(forReadingFrom: URL(fileURLWithPath: bench.directory + "/batch.img"))
        try original.seek(toOffset: offset)
        var block = try #require(try original.read(upToCount: 4096)).map { ~$0 }
        try original.close()
        try #require(block.count == 4096)
        #expect(pwrite(fd, &block, 4096, off_t(offset)) == 4096)
        fsync(fd)
        close(fd)
        try bench.waitForStatus("all three finished", timeout: .seconds(90)) { s in ["V1", "V2", "V3"].allSatisfy { s.slot($0)?.job?.state.isFinal == true } }
        let jobs = try bench.jobs()
        let v2 = try #require(jobs.first { $0.slot == "V2" })
        // One repair attempt: the block is written again, reads back right, the card is done
        // and holds the image (a card that differs twice: PipelineTests.RepairTests).
        #expect(v2.state == .done, "\(v2.message ?? "")")
        #expect(v2.message == "done after a repair (the card returned other data at byte \(offset) once; rewritten and read back right) — remove card")
        // …and `provision status` shows it too, not a bare "done".
        let statusText = try bench.cli(["status"]).stdout
        #expect(statusText.contains("done after a repair (the card returned other data at byte \(offset) once"), "\(statusText)")
        let imageHash = try Command.check(["sha256sum", bench.directory + "/batch.img"]).stdout.prefix(64)
        let size = try #require(try FileManager.default.attributesOfItem(atPath: bench.directory + "/batch.img")[.size] as? Int64)
        #expect(try liar.sha256(bytes: size) == String(imageHash))
        #expect(jobs.first { $0.slot == "V1" }?.state == .done)
        #expect(jobs.first { $0.slot == "V3" }?.state == .done)
        _ = (a, c)
    }

    @Test("a card inserted while others are written joins the running decompression")
    func cardJoinsMidBatch() throws {
        let bench = try StationBench()
        defer { bench.close() }
        let image = try batchImage(bench)
        try writeBatchConfig(bench, image: image, slots: ["J1", "J2", "J3"])
        let one = try bench.card(slot: "J1", size: 64 << 20)
        let two = try bench.card(slot: "J2", size: 64 << 20)
        try one.throttle(writeBytesPerSecond: 4_000_000)
        try two.throttle(writeBytesPerSecond: 6_000_000)
        try bench.startDaemon()
        try bench.waitForStatus("J1 and J2 writing") { s in
            ["J1", "J2"].allSatisfy { (s.slot($0)?.job?.progress?.bytesDone ?? 0) > 1 << 20 }
        }
        let late = try bench.card(slot: "J3", size: 64 << 20)
        let status = try bench.waitForStatus("all three done", timeout: .seconds(90)) { s in ["J1", "J2", "J3"].allSatisfy { s.slot($0)?.job?.state.isFinal == true } }
        for slot in ["J1", "J2", "J3"] { #expect(status.slot(slot)?.job?.state == .done, "\(slot): \(status.slot(slot)?.job?.message ?? "")") }
        // The late card finished first (unthrottled) while the others were still writing.
        let jobs = try bench.jobs()
        let j3 = try #require(jobs.first { $0.slot == "J3" })
        let j1 = try #require(jobs.first { $0.slot == "J1" })
        #expect(j3.updated < j1.updated)
        #expect(cacheFiles(bench).count == 1)
        let notes = try writingNotes(bench)
        #expect(notes.filter { $0.contains("once for every card") }.count == 1, "\(notes)")
        // Every card holds the image.
        let rawSHA = try sha256(ofFile: bench.directory + "/batch.img")
        for card in [one, two, late] { #expect(try card.sha256(bytes: 48 << 20) == rawSHA) }
    }
}
