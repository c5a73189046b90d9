import ControlProtocol
import Foundation
import Testing
import TestSupport

extension IntegrationTests {
    @Suite("crash and restart")
    struct RestartTests {
        @Test("after kill -9 mid-write the restarted daemon flags the card 'interrupted — rewrite card' and keeps history")
        func killedMidWriteIsInterruptedAfterRestart() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let small = try bench.image("small.img", bytes: 4 << 20)
            let big = try bench.image("big.img", bytes: 64 << 20)
            try bench.writeConfig([.init(name: "HIST", image: small), .init(name: "SLOW", image: big)])
            // 64 MiB at 4 MB/s: the daemon is killed long before it finishes.
            let slow = try bench.card(slot: "SLOW", size: 96 << 20)
            try slow.throttle(writeBytesPerSecond: 4_000_000)
            try bench.card(slot: "HIST", size: 16 << 20)
            let first = try bench.startDaemon()

            let before = try bench.waitForStatus("HIST done and SLOW writing") {
                $0.slot("HIST")?.job?.state == .done
                    && $0.slot("SLOW")?.job?.state == .writing && ($0.slot("SLOW")?.job?.progress?.bytesDone ?? 0) > 0
            }
            let history = try #require(before.slot("HIST")?.job)
            let interrupted = try #require(before.slot("SLOW")?.job)
            let diskSequence = slow.diskSequence
            #expect(first.kill() == 128 + SIGKILL)
            #expect(FileManager.default.fileExists(atPath: bench.socketPath), "a killed daemon leaves its socket file")
            #expect(try bench.cli(["status"]).status == 69, "nobody answers on the stale socket")

            try bench.startDaemon()
            let after = try bench.waitForStatus("SLOW to show its interrupted job") { $0.slot("SLOW")?.job != nil }
            let slot = try #require(after.slot("SLOW"))
            #expect(slot.device == slow.devicePath)
            #expect(slow.diskSequence == diskSequence, "the card was not replaced")
            #expect(slot.job?.id == interrupted.id)
            #expect(slot.job?.state == .interrupted)
            #expect(try bench.statusLine(slot: "SLOW").contains("interrupted — rewrite card"))

            var jobs = try bench.jobs()
            let record = try #require(jobs.first { $0.id == interrupted.id })
            #expect(record.state == .interrupted)
            #expect(record.message?.contains("rewrite card") == true, "message: \(record.message ?? "none")")
            #expect(jobs.first { $0.id == history.id }?.state == .done, "history survives the restart")
            #expect(after.slot("HIST")?.job?.id == history.id)
            #expect(after.slot("HIST")?.job?.state == .done)

            // The card is the same media: it must not be rewritten behind the operator's back.
            let watcher = try bench.watch()
            try Udevd.ensureRunning().trigger(slow.devicePath, action: "change")
            try bench.waitForEvent(watcher, "the change event of \(slow.devicePath)") { $0.kind == .device && $0.device?.device == slow.devicePath }
            jobs = try bench.jobs()
            #expect(jobs.count == 2, "jobs after restart: \(jobs.map { "\($0.id) \($0.state)" })")
            #expect(try bench.status().slot("SLOW")?.job?.state == .interrupted)
        }

        @Test("after a reboot a card with an earlier boot's device number and disk sequence is a new card, and is written")
        func earlierBootsJobIsNotThisCard() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let image = try bench.image("small.img", bytes: 4 << 20)
            try bench.writeConfig([.init(name: "A", image: image)])
            let card = try bench.card(slot: "A", size: 16 << 20)
            let first = try bench.startDaemon()
            let done = try bench.waitForStatus("A done") { $0.slot("A")?.job?.state == .done }
            let old = try #require(done.slot("A")?.job)
            #expect(first.stop() == 0)
            let boot = try Command.check(["sqlite3", bench.ledgerPath, "SELECT DISTINCT boot FROM job"]).stdout
            let thisBoot = try String(contentsOfFile: "/proc/sys/kernel/random/boot_id", encoding: .utf8)
            #expect(boot == thisBoot, "the job carries this boot's id")

            // The kernel counts disk sequences from zero at each boot: the ledger's row is now
            // what an earlier boot left, with the same device number and disk sequence as the
            // card in the reader (the card itself is wiped, as a new card would be).
            try Command.check(["sqlite3", bench.ledgerPath, "UPDATE job SET boot = 'an-earlier-boot'"])
            try Command.check(["dd", "if=/dev/zero", "of=\(card.devicePath)", "bs=1M", "count=4", "oflag=direct", "status=none"])
            let diskSequence = card.diskSequence
            try bench.startDaemon()
            let again = try bench.waitForStatus("A written again") { $0.slot("A")?.job.map { $0.id != old.id && $0.state == .done } ?? false }
            #expect(card.diskSequence == diskSequence, "the same device number and disk sequence")
            #expect(again.slot("A")?.job?.state == .done)
            #expect(try bench.jobs().count == 2)
            #expect(try Command.run(["cmp", "-n", "\(4 << 20)", image, card.devicePath]).succeeded, "the new card holds the image")
        }

        @Test("SIGTERM mid-write records the job as cancelled, and a restart does not rewrite the card")
        func gracefulStopCancelsRunningJob() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let big = try bench.image("big.img", bytes: 64 << 20)
            try bench.writeConfig([.init(name: "SLOW", image: big)])
            let slow = try bench.card(slot: "SLOW", size: 96 << 20)
            try slow.throttle(writeBytesPerSecond: 4_000_000)
            let first = try bench.startDaemon()
            let writing = try bench.waitForStatus("SLOW writing") {
                $0.slot("SLOW")?.job?.state == .writing && ($0.slot("SLOW")?.job?.progress?.bytesDone ?? 0) > 0
            }
            let job = try #require(writing.slot("SLOW")?.job)
            #expect(first.stop() == 0, "provisiond exits 0 on SIGTERM; log:\n\(bench.log)")
            #expect(!FileManager.default.fileExists(atPath: bench.socketPath), "a stopped daemon removes its socket")

            try bench.startDaemon()
            let after = try bench.waitForStatus("SLOW to show its job") { $0.slot("SLOW")?.job != nil }
            #expect(after.slot("SLOW")?.job?.id == job.id)
            #expect(after.slot("SLOW")?.job?.state == .cancelled)
            #expect(try bench.statusLine(slot: "SLOW").contains("cancelled — card incomplete"))
            #expect(try bench.jobs().count == 1)
        }
    }
}
