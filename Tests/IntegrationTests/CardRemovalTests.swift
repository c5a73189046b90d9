import ControlProtocol
import Foundation
import Testing
import TestSupport

extension IntegrationTests {
    @Suite("card removal")
    struct CardRemovalTests {
        @Test("a card pulled while written fails with 'card removed' while the other slot finishes")
        func pulledCardFailsOtherSlotFinishes() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let image = try bench.image("card.img", bytes: 32 << 20)
            try bench.writeConfig([.init(name: "PULL", image: image), .init(name: "KEEP", image: image)])
            // Throttled before the daemon sees them (it starts writing the moment it does):
            // 32 MiB takes 16 s on PULL and 8 s on KEEP.
            let pulled = try bench.card(slot: "PULL", size: 64 << 20)
            try pulled.throttle(writeBytesPerSecond: 2_000_000)
            let kept = try bench.card(slot: "KEEP", size: 64 << 20)
            try kept.throttle(writeBytesPerSecond: 4_000_000)
            try bench.startDaemon()

            let writing = try bench.waitForStatus("PULL to have written 2 MiB") {
                guard let job = $0.slot("PULL")?.job else { return false }
                return job.state == .writing && (job.progress?.bytesDone ?? 0) >= 2 << 20
            }
            let pulledJob = try #require(writing.slot("PULL")?.job)
            let keptJob = try #require(writing.slot("KEEP")?.job)
            #expect(keptJob.state == .writing, "KEEP must still be writing when PULL is pulled, for this to test anything")
            try pulled.pull()

            try bench.waitForStatus("KEEP to finish and PULL's job to end") { _ in
                let jobs = (try? bench.jobs()) ?? []
                return jobs.count == 2 && jobs.allSatisfy(\.state.isFinal)
            }
            let jobs = try bench.jobs()
            let failed = try #require(jobs.first { $0.id == pulledJob.id })
            #expect(failed.state == .failed)
            #expect(failed.message?.contains("card removed") == true, "message: \(failed.message ?? "none")")
            let done = try #require(jobs.first { $0.id == keptJob.id })
            #expect(done.state == .done, "message: \(done.message ?? "none")")
            #expect(try kept.sha256(bytes: 32 << 20) == (try sha256(ofFile: image)))

            // The metrics count what the ledger recorded: the pulled card "failed" (its
            // pipeline may have stopped on the cancel the removal raised, "cancelled").
            let samples = try MetricsTests.scrape(bench)
            #expect(MetricsTests.value(samples, "provision_cards_total", ["outcome": "failed"]) == 1)
            #expect(MetricsTests.value(samples, "provision_cards_total", ["outcome": "cancelled"]) == 0)
            #expect(MetricsTests.value(samples, "provision_cards_total", ["outcome": "done"]) == 1)

            // The pulled card's slot is empty again; the other shows its finished card.
            let status = try bench.waitForStatus("slot PULL to be empty") { $0.slot("PULL")?.device == nil }
            #expect(status.slot("PULL")?.job == nil)
            #expect(status.slot("KEEP")?.job?.state == .done)
            // Only part of the image reached the pulled card.
            #expect(try pulled.backingFileSHA256(bytes: 32 << 20) != (try sha256(ofFile: image)))
        }
    }
}
