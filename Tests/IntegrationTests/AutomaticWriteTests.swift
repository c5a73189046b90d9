import ControlProtocol
import Foundation
import Testing
import TestSupport

extension IntegrationTests {
    @Suite("automatic writing")
    struct AutomaticWriteTests {
        @Test("a card plugged into a slot is written and verified without anyone asking")
        func cardInSlotIsWrittenAndVerified() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let image = try bench.image("card.img", bytes: 24 << 20)
            try bench.writeConfig([.init(name: "A1", image: image)])
            try bench.startDaemon()
            #expect(try bench.status().slot("A1")?.device == nil, "the slot is empty before the card comes")

            let card = try bench.card(slot: "A1", size: 64 << 20)
            let status = try bench.waitForStatus("slot A1 to finish") { $0.slot("A1")?.job?.state.isFinal == true }
            let job = try #require(status.slot("A1")?.job)
            #expect(job.state == .done, "job message: \(job.message ?? "none")\n\(bench.log)")
            #expect(job.message == "done — remove card")
            #expect(job.device == card.devicePath)
            #expect(job.slot == "A1")
            #expect(status.slot("A1")?.device == card.devicePath)
            #expect(try bench.statusLine(slot: "A1").contains("done — remove card"))
            // What is on the card, read back past the page cache, is the image.
            #expect(try card.sha256(bytes: 24 << 20) == (try sha256(ofFile: image)))
            #expect(try bench.jobs().map(\.state) == [.done])
        }

        @Test("a change event on a written card does not start a second job")
        func changeEventAfterWriteDoesNotRewrite() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let image = try bench.image("card.img", bytes: 8 << 20)
            try bench.writeConfig([.init(name: "A1", image: image)])
            try bench.startDaemon()
            let card = try bench.card(slot: "A1", size: 32 << 20)
            let done = try bench.waitForStatus("slot A1 to finish") { $0.slot("A1")?.job?.state.isFinal == true }
            let first = try #require(done.slot("A1")?.job)
            #expect(first.state == .done)

            // udevd already sent one `change` when the daemon closed the card after writing;
            // a second one, as any tool that opens the card for writing causes:
            let watcher = try bench.watch()
            try Udevd.ensureRunning().trigger(card.devicePath, action: "change")
            // The daemon announces every udev event of a device it knows; once it has
            // announced this one, it has decided whether to start a job.
            try bench.waitForEvent(watcher, "the change event of \(card.devicePath)") { $0.kind == .device && $0.device?.device == card.devicePath }
            let jobs = try bench.jobs()
            #expect(jobs.count == 1, "jobs after a change event: \(jobs.map { "\($0.id) \($0.state)" })")
            let after = try bench.status().slot("A1")?.job
            #expect(after?.id == first.id)
            #expect(after?.state == .done)
        }

        @Test("a card that is reinserted is written again (new media, new job)")
        func reinsertedCardIsWrittenAgain() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let image = try bench.image("card.img", bytes: 8 << 20)
            try bench.writeConfig([.init(name: "A1", image: image)])
            try bench.startDaemon()
            let first = try bench.card(slot: "A1", size: 32 << 20)
            try bench.waitForStatus("the first card to finish") { $0.slot("A1")?.job?.state == .done }
            try first.detach()
            try bench.waitForStatus("slot A1 to be empty after the card left") { $0.slot("A1")?.device == nil }

            let second = try bench.card(slot: "A1", size: 32 << 20)
            let status = try bench.waitForStatus("the second card to finish") {
                $0.slot("A1")?.device == second.devicePath && $0.slot("A1")?.job?.state.isFinal == true && (try? bench.jobs().count) == 2
            }
            #expect(status.slot("A1")?.job?.state == .done)
            let jobs = try bench.jobs()
            #expect(jobs.map(\.state) == [.done, .done])
            #expect(try second.sha256(bytes: 8 << 20) == (try sha256(ofFile: image)))
        }
    }
}
