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
    func makeStation(_ scratch: TemporaryDirectory, simulator: SimulatedTegra) throws -> Station {
        try scratch.write("miniloader.bin", filler(136_920, seed: 1))
        try scratch.write("board.bct", filler(8192, seed: 2))
        try scratch.write("u-boot-nodtb-tegra.bin", filler(300_000, seed: 3))
        let dts = try scratch.write("u-boot.dts", Array("/dts-v1/;\n/ { model = \"NVIDIA Jetson TK1\"; config { }; };\n".utf8))
        let r = try Command.run(["dtc", "-I", "dts", "-O", "dtb", "-o", scratch.file("u-boot.dtb"), dts])
        guard r.succeeded else { throw StationTestError(description: r.description) }
        let toml = """
        [station]
        name = "tegra-test"
        ledger = "\(scratch.file("ledger.sqlite"))"
        [profiles.tk1]
        kind = "tegra"
        [profiles.tk1.tegra]
        soc = "tegra124"
        usb_product_ids = [0x7140]
        miniloader = "miniloader.bin"
        bct = "board.bct"
        uboot = "u-boot-nodtb-tegra.bin"
        uboot_dtb = "u-boot.dtb"
        uboot_bss_size = 0x40000
        [profiles.tk1.tegra.env]
        hostname = "lab-{uid}"
        """
        let config = try StationConfig.parse(text: toml, file: scratch.file("station.toml"))
        let ledger = try Ledger(path: config.ledgerPath)
        return Station(config: config, ledger: ledger, logger: quietLogger,
                       jobRunner: DefaultJobRunner(tegraSource: { _, _ in simulator.source }))
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
        try await waitFor(events) { $0.job?.state.isFinal == true }
        let jobs = try await station.jobs(.init())
        #expect(jobs.count == 1)
        let job = try #require(jobs.first)
        #expect(job.state == .done, "\(job.message ?? "")")
        #expect(job.kind == "tegra")
        #expect(job.unit == "101112131415161718191a1b1c1d1e1f")
        let states = try await Ledger(path: scratch.file("ledger.sqlite")).events(job: job.id).map(\.state)
        #expect(states == [.queued, .rcm, .miniloader, .bct, .bootloader, .flashingOnDevice, .done])
        #expect(simulator.record.violations.isEmpty, "\(simulator.record.violations)")
        #expect(simulator.record.bct == filler(8192, seed: 2))
    }

    @Test("a board that NACKs the BCT fails its job with the reason, and the station goes on")
    func failingBoardFailsItsJob() async throws {
        let scratch = try TemporaryDirectory("provision-station")
        let simulator = SimulatedTegra(faults: [.nack(command: 0x04, code: 3)])
        let station = try makeStation(scratch, simulator: simulator)
        let events = await station.subscribe()
        await station.handle(.recovery(.add, board))
        try await waitFor(events) { $0.job?.state.isFinal == true }
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
}
