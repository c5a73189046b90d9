import ControlProtocol
import Foundation
import Testing
import TestSupport

extension IntegrationTests {
    /// Cards the daemon must not write, each shown in `provision status` with its reason
    /// and without a job in the ledger.
    @Suite("refusals")
    struct RefusalTests {
        /// Waits until the slot shows its card refused, then checks the reason in the JSON
        /// status, in the table line, and that nothing was written.
        func expectRefused(_ bench: StationBench, slot: String, card: LoopCard, reason: String,
                           sourceLocation: SourceLocation = #_sourceLocation) throws {
            let status = try bench.waitForStatus("slot \(slot) to show a refusal") { $0.slot(slot)?.refusals != nil || $0.slot(slot)?.job != nil }
            let entry = try #require(status.slot(slot), sourceLocation: sourceLocation)
            #expect(entry.job == nil, "a job was started: \(String(describing: entry.job))", sourceLocation: sourceLocation)
            #expect(entry.device == card.devicePath, sourceLocation: sourceLocation)
            let refusals = entry.refusals ?? []
            #expect(refusals.contains { $0.contains(reason) }, "refusals: \(refusals)", sourceLocation: sourceLocation)
            let line = try bench.statusLine(slot: slot)
            #expect(line.contains("refused: "), "status line: \(line)", sourceLocation: sourceLocation)
            #expect(line.contains(reason), "status line: \(line)", sourceLocation: sourceLocation)
            #expect(try bench.jobs().isEmpty, sourceLocation: sourceLocation)
        }

        @Test("a card larger than max_device_size is refused as not an SD card")
        func oversizedCardIsRefused() throws {
            let bench = try StationBench()
            defer { bench.close() }
            try bench.writeConfig([.init(name: "BIG", image: try bench.image("small.img", bytes: 4 << 20))], maxDeviceSize: "64MiB")
            try bench.startDaemon()
            let card = try bench.card(slot: "BIG", size: 128 << 20)
            try expectRefused(bench, slot: "BIG", card: card, reason: "larger than the station's maximum")
            #expect(try card.sha256() == (try LoopCard.zeroHash(bytes: 128 << 20)), "the card was touched")
        }

        @Test("a write-protected card is refused before the first byte")
        func readOnlyCardIsRefused() throws {
            let bench = try StationBench()
            defer { bench.close() }
            try bench.writeConfig([.init(name: "RO", image: try bench.image("small.img", bytes: 4 << 20))])
            try bench.startDaemon()
            let card = try bench.card(slot: "RO", size: 32 << 20, options: .init(readOnly: true))
            try expectRefused(bench, slot: "RO", card: card, reason: "write-protected")
        }

        @Test("a card with a mounted file system is refused as in use")
        func mountedCardIsRefused() throws {
            let bench = try StationBench()
            defer { bench.close() }
            try bench.writeConfig([.init(name: "MNT", image: try bench.image("small.img", bytes: 4 << 20))])
            let card = try bench.card(slot: "MNT", size: 32 << 20)
            let point = try bench.mount(card)
            try "still here\n".write(toFile: point + "/canary", atomically: true, encoding: .utf8)
            // Started after the mount: the daemon's enumeration finds the card in use.
            try bench.startDaemon()
            try expectRefused(bench, slot: "MNT", card: card, reason: "in use: mounted at \(point)")
            #expect(try String(contentsOfFile: point + "/canary", encoding: .utf8) == "still here\n")
        }

        @Test("a card refused while mounted is written once it is unmounted")
        func unmountedCardIsWrittenAfterwards() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let image = try bench.image("small.img", bytes: 4 << 20)
            try bench.writeConfig([.init(name: "MNT", image: image)])
            let card = try bench.card(slot: "MNT", size: 32 << 20)
            let point = try bench.mount(card)
            try bench.startDaemon()
            try expectRefused(bench, slot: "MNT", card: card, reason: "in use: mounted at \(point)")

            // Unmounting closes the card after writing: udevd sends a `change` for it.
            try bench.unmount(point)
            try Udevd.ensureRunning().trigger(card.devicePath, action: "change")

            let status = try bench.waitForStatus("the unmounted card to be written", timeout: .seconds(120)) {
                $0.slot("MNT")?.job?.state.isFinal == true
            }
            #expect(status.slot("MNT")?.job?.state == .done)
            #expect(status.slot("MNT")?.refusals == nil)
        }

        @Test("a card smaller than the image is refused as too small")
        func tooSmallCardIsRefused() throws {
            let bench = try StationBench()
            defer { bench.close() }
            try bench.writeConfig([.init(name: "TINY", image: try bench.image("big.img", bytes: 16 << 20))])
            try bench.startDaemon()
            let card = try bench.card(slot: "TINY", size: 8 << 20)
            try expectRefused(bench, slot: "TINY", card: card, reason: "card too small: image needs \(16 << 20) bytes, card has \(8 << 20)")
        }

        @Test("a card in no configured slot is listed as refused and not written")
        func cardOutsideSlotsIsNotWritten() throws {
            let bench = try StationBench()
            defer { bench.close() }
            try bench.writeConfig([.init(name: "A1", image: try bench.image("small.img", bytes: 4 << 20))])
            try bench.startDaemon()
            let stray = try bench.card(slot: "STRAY", size: 16 << 20)
            let status = try bench.waitForStatus("the stray card to be listed") { $0.refused.contains { $0.device == stray.devicePath } }
            let entry = try #require(status.refused.first { $0.device == stray.devicePath })
            #expect(entry.refusals.contains { $0.contains("in no configured slot") }, "refusals: \(entry.refusals)")
            #expect(status.slot("A1")?.device == nil)
            let table = try bench.cli(["status"]).stdout
            #expect(table.contains("refused \(stray.devicePath)"), "status:\n\(table)")
            #expect(try bench.jobs().isEmpty)
        }
    }
}

extension LoopCard {
    /// SHA-256 of `bytes` zero bytes: what an untouched (sparse, new) card reads as.
    static func zeroHash(bytes: Int64) throws -> String {
        let output = try Command.bash("head -c \(bytes) /dev/zero | sha256sum")
        return String(output.stdout.prefix(64))
    }
}
