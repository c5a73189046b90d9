import Foundation
import Synchronization
import Testing
import TestSupport
@testable import Tegra

/// The whole T124 sequence against the simulated boot ROM and miniloader, and every fault.
// Serialized: these synchronous tests keep a cooperative-pool thread busy (CPU or a child
// process); one at a time leaves the pool to the async suites (the station's jobs await on it).
@Suite(.serialized) struct TegraFlasherTests {
    final class PhaseLog: Sendable {
        let entries = Mutex<[(TegraPhase, Double)]>([])
        func add(_ phase: TegraPhase, _ fraction: Double) { entries.withLock { $0.append((phase, fraction)) } }
        var phases: [TegraPhase] {
            entries.withLock { list in list.map(\.0).reduce(into: []) { if $0.last != $1 { $0.append($1) } } }
        }
    }

    func flasher(_ device: SimulatedTegra, _ inputs: TegraFlashInputs, log: PhaseLog = PhaseLog()) -> TegraFlasher {
        TegraFlasher(source: device.source, inputs: inputs, timeoutMilliseconds: 50,
                     reenumerationTimeoutSeconds: 0.3) { log.add($0, $1) }
    }

    @Test func flashesABoardFromRecoveryToFlasherUBoot() throws {
        let directory = try TemporaryDirectory()
        let inputs = try syntheticInputs(in: directory)
        let device = SimulatedTegra()
        let log = PhaseLog()
        let report = try flasher(device, inputs, log: log).run()
        let record = device.record

        #expect(record.violations.isEmpty, "\(record.violations)")
        #expect(report.uid == "101112131415161718191a1b1c1d1e1f")
        #expect(report.rcmVersion == 0x0040_0001 && !report.miniloaderWasRunning)
        #expect(report.platformInfo.bootDeviceName == "eMMC")
        #expect(log.phases == [.rcm, .miniloader, .bct, .bootloader, .flashingOnDevice])

        #expect(record.rcmMessages.map(\.opcode) == [6, 4])
        #expect(record.rcmMessages[0].transferSizes == [1028])
        #expect(record.rcmMessages[1].transferSizes == Array(repeating: 4096, count: 33) + [2404])
        #expect(record.miniloader == inputs.miniloader && record.miniloaderEntry == 0x4000_E000)
        #expect(record.reenumerations == 1 && record.opens == 2)

        #expect(record.nv3pCommands == [0x01, 0x04, 0x06])
        #expect(record.bct == inputs.usbBCT && record.bct == inputs.bct)
        // The target's habits were met on the way: padded packets and packets split over reads.
        #expect(record.paddedPackets > 0 && record.splitPackets > 0)
        let payload = try FlasherPayload(inputs: inputs, environment: inputs.substitutedEnvironment(uid: report.uid))
        #expect(record.bootloader == payload.bytes)
        #expect(record.bootloaderLoadAddress == 0x8010_8000 && record.bootloaderEntry == 0x8010_8000)
        let full = payload.bytes.count / 65_536
        #expect(record.hostDataPacketLengths == [8192] + Array(repeating: 65_536, count: full) + [payload.bytes.count % 65_536])
        #expect(report.script.contains("setenv hostname 'bench-07'"))
        #expect(report.script.contains("setenv unit_uid '\(report.uid)'"))
        // The flasher writes boot0 and resets: the simulated boot ROM boots what it wrote.
        #expect(device.resetAfterFlash())
        #expect(record.bootloader != nil)
        #expect(device.record.bootVerdict == .booted(bootloaderLength: inputs.flashedUBoot.count, loadAddress: 0x8010_8000))
    }

    @Test func skipsRCMWhenTheMiniloaderIsAlreadyRunning() throws {
        let directory = try TemporaryDirectory()
        let device = SimulatedTegra(faults: [.miniloaderAlreadyRunning])
        let report = try flasher(device, try syntheticInputs(in: directory)).run()
        #expect(report.miniloaderWasRunning && report.rcmVersion == nil)
        #expect(report.uid == "101112131415161718191a1b1c1d1e1f", "UID from platform info")
        #expect(device.record.rcmMessages.isEmpty && device.record.violations.isEmpty)
    }

    @Test func readsPlatformInfoForTegraInfo() throws {
        let device = SimulatedTegra()
        let (uid, info) = try TegraFlasher.platformInfo(source: device.source, chip: .t124, miniloader: pattern(136_920, seed: 1),
                                                        timeoutMilliseconds: 50, reenumerationTimeoutSeconds: 0.3)
        #expect(uid == "101112131415161718191a1b1c1d1e1f" && info.chipID == 0x40 && info.operatingMode == 3)
        #expect(device.record.nv3pCommands == [0x01] && device.record.violations.isEmpty)
    }

    // MARK: flows a person really runs

    /// `provision tegra info` without a profile reads the UID and asks the RCM version; the boot
    /// ROM sends its UID only once, so the flash after it gets none, finds the boot ROM (not the
    /// miniloader) answering, and goes through RCM anyway.
    @Test func infoThenFlash() throws {
        let directory = try TemporaryDirectory()
        let device = SimulatedTegra()
        let probe = try TegraFlasher.probe(source: device.source, timeoutMilliseconds: 50)
        #expect(probe.uid == "101112131415161718191a1b1c1d1e1f" && probe.rcmVersion == 0x0040_0001)
        let report = try flasher(device, try syntheticInputs(in: directory)).run()
        #expect(report.uid == probe.uid, "the UID comes from the platform info")
        #expect(!report.miniloaderWasRunning && report.rcmVersion == 0x0040_0001)
        #expect(device.record.nonRCMInBootROM == 1 && device.record.uidsSent == 1)
        #expect(device.record.violations.isEmpty, "\(device.record.violations)")
        #expect(device.resetAfterFlash())
    }

    /// `provision tegra info --profile` leaves the miniloader running; the flash after it finds
    /// the miniloader (a new session: its sequence starts again at 0) and skips RCM.
    @Test func infoWithProfileThenFlash() throws {
        let directory = try TemporaryDirectory()
        let inputs = try syntheticInputs(in: directory)
        let device = SimulatedTegra()
        let (uid, _) = try TegraFlasher.platformInfo(source: device.source, chip: .t124, miniloader: inputs.miniloader,
                                                     timeoutMilliseconds: 50, reenumerationTimeoutSeconds: 0.3)
        let report = try flasher(device, inputs).run()
        #expect(report.uid == uid && report.miniloaderWasRunning)
        #expect(device.record.rcmMessages.map(\.opcode) == [6, 4], "RCM only once, for the info")
        #expect(device.record.violations.isEmpty, "\(device.record.violations)")
        #expect(device.resetAfterFlash())
    }

    @Test func probeTwiceSaysWhatItFinds() throws {
        let device = SimulatedTegra()
        _ = try TegraFlasher.probe(source: device.source, timeoutMilliseconds: 50)
        let again = try TegraFlasher.probe(source: device.source, timeoutMilliseconds: 50)
        #expect(again.uid == nil && again.rcmVersion == 0x0040_0001 && !again.miniloaderRunning)
        let running = SimulatedTegra(faults: [.miniloaderAlreadyRunning])
        let found = try TegraFlasher.probe(source: running.source, timeoutMilliseconds: 50)
        #expect(found.miniloaderRunning && found.uid == "101112131415161718191a1b1c1d1e1f" && found.rcmVersion == nil)
    }

    @Test(arguments: [SimulatedTegra.Fault.withholdUID, .resendUID])
    func uidWithheldOrResentStillFlashes(fault: SimulatedTegra.Fault) throws {
        let directory = try TemporaryDirectory()
        let device = SimulatedTegra(faults: [fault])
        if fault == .resendUID { _ = try TegraFlasher.probe(source: device.source, timeoutMilliseconds: 50) }
        let report = try flasher(device, try syntheticInputs(in: directory)).run()
        #expect(report.uid == "101112131415161718191a1b1c1d1e1f")
        #expect(device.record.nonRCMInBootROM == (fault == .withholdUID ? 1 : 0))
        #expect(device.record.violations.isEmpty, "\(device.record.violations)")
    }

    @Test(arguments: [SimulatedTegra.Step.miniloaderUpload, .bootloaderData])
    func flashInterruptedByUnplugThenRetried(step: SimulatedTegra.Step) throws {
        let directory = try TemporaryDirectory()
        let inputs = try syntheticInputs(in: directory)
        let device = SimulatedTegra(faults: [.disconnect(step, afterBytes: step == .miniloaderUpload ? 50_000 : 200_000)])
        let started = Date()
        let error = try #require(throws: TegraError.self) { try flasher(device, inputs).run() }
        #expect(error.kind == .deviceGone)
        // While unplugged, a retry says so and does not hang.
        let absent = try #require(throws: TegraError.self) { try flasher(device, inputs).run() }
        #expect(absent.kind == .noDevice)
        device.replug()
        let report = try flasher(device, inputs).run()
        #expect(report.uid == "101112131415161718191a1b1c1d1e1f")
        #expect(Date().timeIntervalSince(started) < 30)
        #expect(device.record.violations.isEmpty, "\(device.record.violations)")
        #expect(device.resetAfterFlash())
    }

    @Test func twoBoardsAtOnce() async throws {
        let directory = try TemporaryDirectory()
        let inputs = try syntheticInputs(in: directory)
        let boards = [SimulatedTegra(uid: Array(0x10...0x1F)), SimulatedTegra(uid: Array(0xA0...0xAF))]
        let reports = try await withThrowingTaskGroup(of: TegraFlashReport.self) { group in
            for board in boards {
                let job = self.flasher(board, inputs)
                group.addTask {
                    // Each board on its own thread, as the station runs them.
                    try await withCheckedThrowingContinuation { continuation in
                        Thread { continuation.resume(with: Result(catching: { try job.run() })) }.start()
                    }
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(Set(reports.map(\.uid)) == ["101112131415161718191a1b1c1d1e1f", "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"])
        for board in boards {
            #expect(board.record.violations.isEmpty, "\(board.record.violations)")
            #expect(board.resetAfterFlash())
        }
    }

    @Test func miniloaderWithAnotherProductIDHighByteIsTheSameBoard() throws {
        let directory = try TemporaryDirectory()
        let device = SimulatedTegra(faults: [.productIDAfterReenumeration(0x7F40)])
        let report = try flasher(device, try syntheticInputs(in: directory)).run()
        #expect(report.uid == "101112131415161718191a1b1c1d1e1f")
        #expect(LibUSBDeviceSource.isSameChipAfterReenumeration(original: 0x7140, found: 0x7F40))
        #expect(!LibUSBDeviceSource.isSameChipAfterReenumeration(original: 0x7140, found: 0x7130))
        #expect(!LibUSBDeviceSource.isSameChipAfterReenumeration(original: 0x7140, found: 0x7199))
    }

    /// The simulated miniloader checks the BCT's signature with its own CMAC: a raw BCT changed
    /// after cbootimage signed it is refused as the board would (STATUS "invalid BCT").
    @Test func aBCTWhoseSignatureDoesNotVerifyIsRefusedByTheMiniloader() throws {
        let (error, device) = try failure([], mutate: { $0.bct[0x1000] ^= 0x01 })
        #expect(error.kind == .status(0x0C) && error.message.contains("invalid BCT"))
        #expect(device.record.violations.contains { $0.contains("AES-CMAC") })
        #expect(device.record.bootloader == nil)
    }

    @Test func uidCheckStopsBeforeAnythingIsSent() throws {
        let directory = try TemporaryDirectory()
        let device = SimulatedTegra()
        let flasher = TegraFlasher(source: device.source, inputs: try syntheticInputs(in: directory), timeoutMilliseconds: 50,
                                   reenumerationTimeoutSeconds: 0.3, uidCheck: { uid in
            throw TegraError(.cameBack, "came back: \(uid)")
        })
        let error = try #require(throws: TegraError.self) { try flasher.run() }
        #expect(error.kind == .cameBack && error.message.contains("101112"))
        #expect(device.record.rcmMessages.isEmpty && device.record.miniloader == nil)
    }

    func failure(_ faults: [SimulatedTegra.Fault], chip: TegraChip = .t124, productID: UInt16 = 0x7140,
                 uidLength: Int = 16, mutate: (inout TegraFlashInputs) -> Void = { _ in }) throws -> (TegraError, SimulatedTegra) {
        let directory = try TemporaryDirectory()
        var inputs = try syntheticInputs(in: directory)
        mutate(&inputs)
        let device = SimulatedTegra(chip: chip, productID: productID, uid: Array(0x10..<(0x10 + UInt8(uidLength))), faults: faults)
        let started = Date()
        let error = try #require(throws: TegraError.self) { try flasher(device, inputs).run() }
        #expect(Date().timeIntervalSince(started) < 15, "a fault must end quickly, not hang (50 ms transfer timeouts; the bound allows a loaded machine)")
        #expect(!error.message.isEmpty)
        return (error, device)
    }

    @Test func wrongUIDLengthIsAClearError() throws {
        let (error, _) = try failure([.uidLength(12)])
        #expect(error.kind == .unexpectedUIDLength(12))
        #expect(error.message.contains("12-byte UID"))
    }

    @Test func secureBootBoardIsRefusedWithAnExplanation() throws {
        let (error, device) = try failure([.secureBoot])
        #expect(error.kind == .secureBoot)
        #expect(error.message.contains("secure boot") && error.message.contains("RSA-PSS"))
        #expect(device.record.miniloader == nil, "nothing sent after the rejection")
    }

    @Test func silentRCMVersionReplyTimesOut() throws {
        let (error, _) = try failure([.silentAt(.rcmVersionReply)])
        #expect(error.kind == .timeout && error.message.contains("RCM version query"))
    }

    @Test func silentMiniloaderReplyTimesOut() throws {
        let (error, _) = try failure([.silentAt(.miniloaderReply)])
        #expect(error.kind == .timeout && error.message.contains("miniloader"))
    }

    @Test func unplugDuringMiniloaderUploadIsDeviceGone() throws {
        let (error, _) = try failure([.disconnect(.miniloaderUpload, afterBytes: 50_000)])
        #expect(error.kind == .deviceGone)
    }

    @Test func deviceThatNeverComesBackAfterTheMiniloaderIsAnError() throws {
        let (error, _) = try failure([.neverReenumerates])
        #expect(error.kind == .reenumerationTimeout && error.message.contains("did not come back"))
    }

    @Test func silentPlatformInfoTimesOut() throws {
        let (error, _) = try failure([.silentAt(.platformInfo)])
        #expect(error.kind == .timeout)
    }

    @Test func corruptPlatformInfoChecksumIsAProtocolViolation() throws {
        let (error, _) = try failure([.corruptPlatformInfoChecksum])
        #expect(error.kind == .protocolViolation && error.message.contains("checksum"))
    }

    @Test(arguments: [0, 2, 7] as [UInt32])
    func lockedOperatingModeStopsBeforeTheBCT(mode: UInt32) throws {
        let (error, device) = try failure([.operatingMode(mode)])
        #expect(error.kind == .unsupportedOperatingMode(mode))
        #expect(device.record.bct == nil)
    }

    @Test func nackOfTheBCTDownloadIsReported() throws {
        let (error, _) = try failure([.nack(command: 0x04, code: 3)])
        #expect(error.kind == .nack(3) && error.message.contains("bad data"))
    }

    @Test func nackOfPlatformInfoIsReported() throws {
        let (error, _) = try failure([.nack(command: 0x01, code: 2)])
        #expect(error.kind == .nack(2) && error.message.contains("bad command"))
    }

    @Test func invalidBCTStatusIsReported() throws {
        let (error, device) = try failure([.badStatus(command: 0x04, code: 0x0C)])
        #expect(error.kind == .status(0x0C) && error.message.contains("invalid BCT"))
        #expect(device.record.bootloader == nil)
    }

    @Test func badStatusOfTheBootloaderDownloadIsReported() throws {
        let (error, _) = try failure([.badStatus(command: 0x06, code: 2)])
        #expect(error.kind == .status(2) && error.message.contains("device failure"))
    }

    @Test func badStatusOfPlatformInfoIsReported() throws {
        let (error, _) = try failure([.badStatus(command: 0x01, code: 4)])
        #expect(error.kind == .status(4) && error.message.contains("invalid state"))
    }

    @Test func silentBCTStatusTimesOut() throws {
        let (error, _) = try failure([.silentAt(.bctStatus)])
        #expect(error.kind == .timeout)
    }

    @Test func silentBootloaderStatusTimesOut() throws {
        let (error, _) = try failure([.silentAt(.bootloaderStatus)])
        #expect(error.kind == .timeout)
    }

    @Test func missingDataAcksTimeOut() throws {
        let (error, _) = try failure([.silentAt(.bootloaderData)])
        #expect(error.kind == .timeout)
    }

    @Test func unplugDuringBootloaderDownloadIsDeviceGone() throws {
        let (error, device) = try failure([.disconnect(.bootloaderData, afterBytes: 200_000)])
        #expect(error.kind == .deviceGone)
        #expect(device.record.bootloader == nil)
    }

    @Test func profileForAnotherChipIsRefusedBeforeAnyTransfer() throws {
        let (error, device) = try failure([], chip: .t30, productID: 0x7030, uidLength: 8)
        #expect(error.kind == .invalidInput && error.message.contains("T30"))
        #expect(device.record.rcmMessages.isEmpty)
    }

    @Test func productIDOutsideTheProfileListIsRefused() throws {
        let (error, _) = try failure([], mutate: { $0.usbProductIDs = [0x7740] })
        #expect(error.kind == .invalidInput && error.message.contains("0x7740"))
    }

    @Test func cancelStopsBetweenTransfers() throws {
        let directory = try TemporaryDirectory()
        let device = SimulatedTegra()
        let box = Mutex<TegraFlasher?>(nil)
        let flasher = TegraFlasher(source: device.source, inputs: try syntheticInputs(in: directory),
                                   timeoutMilliseconds: 50, reenumerationTimeoutSeconds: 0.3) { phase, _ in
            if phase == .bct { box.withLock { $0?.cancel() } }
        }
        box.withLock { $0 = flasher }
        let error = try #require(throws: TegraError.self) { try flasher.run() }
        #expect(error.kind == .cancelled)
        #expect(device.record.bootloader == nil)
    }

    @Test func chipsBelowT124SpeakTheirOwnRCMVersion() throws {
        // A T30 answers the v1 version query; the flow up to the miniloader uses v1 messages.
        let directory = try TemporaryDirectory()
        var inputs = try syntheticInputs(in: directory)
        inputs.chip = .t30
        inputs.bct = try ReferenceBCT.make(.t30, in: directory)
        inputs.usbProductIDs = [0x7030]
        inputs.miniloaderEntry = 0x4000_A000
        let device = SimulatedTegra(chip: .t30, productID: 0x7030, uid: Array(1...8))
        let report = try flasher(device, inputs).run()
        #expect(report.rcmVersion == 0x0001_0000 && report.uid == "0102030405060708")
        #expect(device.record.violations.isEmpty, "\(device.record.violations)")
    }
}
