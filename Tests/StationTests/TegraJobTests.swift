import BlockDevices
import ControlProtocol
import Foundation
@testable import Station
import Tegra
import Testing
import TestSupport

/// A Tegra job in the station, end to end, against the simulated boot ROM (no USB bus exists
/// here). The station sees the board as udev would report it and runs the whole T124 flow.
@Suite("Tegra jobs in the station")
struct TegraJobTests {
    func makeStation(_ scratch: TemporaryDirectory, simulator: SimulatedTegra, boards: [String: SimulatedTegra] = [:],
                     extra: String = "") throws -> Station {
        try scratch.write("miniloader.bin", filler(136_920, seed: 1))
        try scratch.write("board.bct", try ReferenceBCT.make(in: scratch))
        try scratch.write("u-boot-nodtb-tegra.bin", filler(300_000, seed: 3))
        let dts = try scratch.write("u-boot.dts", Array("/dts-v1/;\n/ { model = \"NVIDIA Jetson TK1\"; config { }; };\n".utf8))
        let r = try Command.run(["dtc", "-I", "dts", "-O", "dtb", "-o", scratch.file("u-boot.dtb"), dts])
        guard r.succeeded else { throw StationTestError(description: r.description) }
        let config = try StationConfig.parse(text: Self.toml(scratch, extra: extra), file: scratch.file("station.toml"))
        let ledger = try Ledger(path: config.ledgerPath)
        return Station(config: config, ledger: ledger, logger: quietLogger,
                       jobRunner: DefaultJobRunner(tegraSource: { usb, _ in (boards[usb.syspath] ?? simulator).source }))
    }

    /// The station config of `makeStation`: one TK1 profile on the files it writes.
    static func toml(_ scratch: TemporaryDirectory, extra: String = "", env: String = "hostname = \"lab-{uid}\"",
                     dtb: String = "uboot_dtb = \"u-boot.dtb\"", ids: String = "[0x7140]") -> String {
        """
        [station]
        name = "tegra-test"
        ledger = "\(scratch.file("ledger.sqlite"))"
        [profiles.tk1]
        kind = "tegra"
        [profiles.tk1.tegra]
        soc = "tegra124"
        usb_product_ids = \(ids)
        miniloader = "miniloader.bin"
        bct = "board.bct"
        uboot = "u-boot-nodtb-tegra.bin"
        \(dtb)
        uboot_bss_size = 0x40000
        \(extra)
        [profiles.tk1.tegra.env]
        \(env)
        """
    }

    @Test("the config check builds a Tegra profile's inputs and payload as a board's job would: what would fail at the board fails now, naming it")
    func configCheckBuildsThePayload() throws {
        let scratch = try TemporaryDirectory("provision-station")
        _ = try makeStation(scratch, simulator: SimulatedTegra())  // writes the profile's files
        func check(_ toml: String) throws -> String? {
            let config = try StationConfig.parse(text: toml, file: scratch.file("station.toml"))
            do { try config.profiles["tk1"]!.checkFiles() } catch { return "\(error)" }
            return nil
        }
        #expect(try check(Self.toml(scratch)) == nil, "the fixture's profile is good")
        try scratch.write("random.bct", filler(8192, seed: 9))
        let cases: [(String, String)] = [
            (Self.toml(scratch, env: "serial = \"it's {unit}; reset\""), "serial"),
            (Self.toml(scratch, dtb: ""), "uboot_dtb is missing"),
            (Self.toml(scratch, ids: "[0x7030]"), "0x7030 is not a"),
            (Self.toml(scratch, extra: "boot_device = \"nand\""), "boot_device \"nand\""),
            (Self.toml(scratch).replacingOccurrences(of: "bct = \"board.bct\"", with: "bct = \"random.bct\""), "random.bct"),
        ]
        for (toml, why) in cases {
            let error = try check(toml)
            #expect(error?.contains(why) == true, "\(why): \(error ?? "passed the config check")")
            #expect(error?.contains("station.toml") == true, "the error names the file: \(error ?? "")")
        }
    }

    let board = RecoveryUSBDevice(syspath: "/sys/devices/pci0000:00/usb1/1-2", devnode: "/dev/bus/usb/001/007",
                                  vendorID: 0x0955, productID: 0x7140, busNumber: 1, deviceAddress: 7, serial: nil)

    @Test("a board in recovery mode becomes one job that goes rcm → miniloader → bct → bootloader → done, named by its chip UID")
    func flashesBoardThroughAllPhases() async throws {
        let scratch = try TemporaryDirectory("provision-station")
        let simulator = SimulatedTegra()
        let station = try makeStation(scratch, simulator: simulator)
        let events = await station.subscribe()
        await station.handle(.recovery(.add, board))
        // Re-enumeration (remove + add on the same port) must not start a second job.
        await station.handle(.recovery(.add, board))
        try await waitFor(events, seconds: 300) { $0.job?.state.isFinal == true }
        let jobs = try await station.jobs(.init())
        #expect(jobs.count == 1)
        let job = try #require(jobs.first)
        #expect(job.state == .done, "\(job.message ?? "")")
        #expect(job.kind == "tegra")
        #expect(job.unit == "101112131415161718191a1b1c1d1e1f")
        let states = try await Ledger(path: scratch.file("ledger.sqlite")).events(job: job.id).map(\.state)
        #expect(states == [.queued, .rcm, .miniloader, .bct, .bootloader, .flashingOnDevice, .done])
        #expect(simulator.record.violations.isEmpty, "\(simulator.record.violations)")
        #expect(simulator.record.bct == [UInt8](try Data(contentsOf: URL(fileURLWithPath: scratch.file("board.bct")))))
        #expect(simulator.resetAfterFlash(), "the board boots what was written: \(String(describing: simulator.record.bootVerdict))")
    }

    @Test("a board that NACKs the BCT fails its job with the reason, and the station goes on")
    func failingBoardFailsItsJob() async throws {
        let scratch = try TemporaryDirectory("provision-station")
        let simulator = SimulatedTegra(faults: [.nack(command: 0x04, code: 3)])
        let station = try makeStation(scratch, simulator: simulator)
        let events = await station.subscribe()
        await station.handle(.recovery(.add, board))
        try await waitFor(events, seconds: 300) { $0.job?.state.isFinal == true }
        let job = try #require(try await station.jobs(.init()).first)
        #expect(job.state == .failed)
        #expect(job.message?.isEmpty == false)
        #expect(await station.runningJobCount == 0)
    }

    @Test("a board with no matching tegra profile starts nothing")
    func unknownBoardIsIgnored() async throws {
        let scratch = try TemporaryDirectory("provision-station")
        let station = try makeStation(scratch, simulator: SimulatedTegra())
        var t30 = board
        t30.productID = 0x7030
        await station.handle(.recovery(.add, t30))
        #expect(try await station.jobs(.init()).isEmpty)
    }

    /// Waits until `count` jobs are final, and returns them oldest first.
    func waitForFinalJobs(_ station: Station, count: Int) async throws -> [JobRecord] {
        let deadline = Date().addingTimeInterval(300)
        while Date() < deadline {
            let jobs = try await station.jobs(.init())
            let running = await station.runningJobCount
            // The port is released after the final state is in the ledger: a board showing up
            // again before that is the running job's own re-enumeration.
            let ports = await station.tegraPorts
            if jobs.count >= count && jobs.allSatisfy({ $0.state.isFinal }) && running == 0 && ports.isEmpty {
                return jobs.reversed()
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        throw StationTestError(description: "jobs did not finish within 300 s")
    }

    @Test("a board back in recovery soon after its done is not flashed again; the job says why; recovery once more flashes it")
    func boardThatCameBackIsNotFlashedInALoop() async throws {
        let scratch = try TemporaryDirectory("provision-station")
        let simulator = SimulatedTegra(faults: [.neverBoots])
        let station = try makeStation(scratch, simulator: simulator)
        await station.handle(.recovery(.add, board))
        let first = try await waitForFinalJobs(station, count: 1)
        #expect(first.map(\.state) == [.done])
        // The flasher U-Boot wrote boot0 and reset; this board does not start and falls back to recovery.
        #expect(!simulator.resetAfterFlash())
        await station.handle(.recovery(.add, board))
        let second = try await waitForFinalJobs(station, count: 2)
        let cameBack = second[1]
        #expect(cameBack.state == .failed)
        #expect(cameBack.message == "flashed, but the board came back in recovery mode: it did not boot (check the BCT)")
        #expect(cameBack.unit == "101112131415161718191a1b1c1d1e1f")
        let ledger = try Ledger(path: scratch.file("ledger.sqlite"))
        let events = try await ledger.events(job: cameBack.id)
        #expect(events.last?.state == .failed && events.last?.message == cameBack.message)
        #expect(simulator.record.rcmMessages.filter { $0.opcode == 4 }.count == 1, "the miniloader went once: nothing was sent again")
        // The operator puts it into recovery on purpose: this time it is flashed.
        await station.handle(.recovery(.add, board))
        let third = try await waitForFinalJobs(station, count: 3)
        #expect(third[2].state == .done, "\(third[2].message ?? "")")
        #expect(simulator.record.rcmMessages.filter { $0.opcode == 4 }.count == 2)
    }

    @Test("came_back_window = 0 flashes a board every time it shows up")
    func windowZeroTurnsTheCheckOff() async throws {
        let scratch = try TemporaryDirectory("provision-station")
        let simulator = SimulatedTegra(faults: [.neverBoots])
        let station = try makeStation(scratch, simulator: simulator, extra: "came_back_window = 0")
        await station.handle(.recovery(.add, board))
        _ = try await waitForFinalJobs(station, count: 1)
        #expect(!simulator.resetAfterFlash())
        await station.handle(.recovery(.add, board))
        let jobs = try await waitForFinalJobs(station, count: 2)
        #expect(jobs.map(\.state) == [.done, .done])
    }

    @Test("a board that came back after the window is flashed again")
    func boardAfterTheWindowIsFlashed() async throws {
        let scratch = try TemporaryDirectory("provision-station")
        let simulator = SimulatedTegra(faults: [.neverBoots])
        let station = try makeStation(scratch, simulator: simulator, extra: "came_back_window = 1")
        await station.handle(.recovery(.add, board))
        _ = try await waitForFinalJobs(station, count: 1)
        #expect(!simulator.resetAfterFlash())
        try await Task.sleep(for: .milliseconds(1100))  // the window itself is what is tested
        await station.handle(.recovery(.add, board))
        let jobs = try await waitForFinalJobs(station, count: 2)
        #expect(jobs.map(\.state) == [.done, .done])
    }

    @Test("two boards at once: two jobs, each named by its own UID, both done")
    func twoBoardsAtOnce() async throws {
        let scratch = try TemporaryDirectory("provision-station")
        var second = board
        second.syspath = "/sys/devices/pci0000:00/usb1/1-3"
        second.deviceAddress = 9
        let boards = [board.syspath: SimulatedTegra(uid: Array(0x10...0x1F)), second.syspath: SimulatedTegra(uid: Array(0xA0...0xAF))]
        let station = try makeStation(scratch, simulator: SimulatedTegra(), boards: boards)
        await station.handle(.recovery(.add, board))
        await station.handle(.recovery(.add, second))
        let jobs = try await waitForFinalJobs(station, count: 2)
        #expect(jobs.allSatisfy { $0.state == .done }, "\(jobs.map { $0.message ?? "" })")
        #expect(Set(jobs.compactMap(\.unit)) == ["101112131415161718191a1b1c1d1e1f", "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"])
        for simulator in boards.values {
            #expect(simulator.record.violations.isEmpty)
            #expect(simulator.resetAfterFlash())
        }
    }
}
