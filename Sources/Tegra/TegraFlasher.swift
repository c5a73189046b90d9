import Foundation
import Synchronization

/// The steps of a Tegra job, in order, as `provision status` shows them.
public enum TegraPhase: String, Sendable, CaseIterable, CustomStringConvertible {
    case rcm, miniloader, bct, bootloader, flashingOnDevice

    public var description: String {
        switch self {
        case .rcm: "rcm"
        case .miniloader: "miniloader"
        case .bct: "bct"
        case .bootloader: "bootloader"
        case .flashingOnDevice: "flashing-on-device"
        }
    }
}

/// What a finished run did.
public struct TegraFlashReport: Sendable {
    /// The chip UID as hex: the unit's identity.
    public let uid: String
    public let chip: TegraChip
    /// The boot ROM's RCM version, nil when the miniloader was already running.
    public let rcmVersion: UInt32?
    public let miniloaderWasRunning: Bool
    public let platformInfo: TegraPlatformInfo
    public let bootloaderBytes: Int
    public let flashImageBytes: Int
    public let flashImageCRC32: UInt32
    /// The script the flasher U-Boot now runs (its `>>>` lines show on the serial console).
    public let script: String
    public let seconds: Double
}

/// Drives one board from recovery mode to "flasher U-Boot running".
///
/// Blocking: call `run()` on a dedicated thread. `cancel()` may be called from any thread;
/// it takes effect between transfers (each bounded by the transfer timeout).
public final class TegraFlasher: Sendable {
    private let source: any TegraDeviceSource
    private let inputs: TegraFlashInputs
    private let progress: @Sendable (TegraPhase, Double) -> Void
    private let timeoutMilliseconds: Int
    private let reenumerationTimeoutSeconds: Double
    private let cancelled = Atomic<Bool>(false)

    /// Called with the chip UID as soon as it is known and before anything is written to the
    /// board; throwing stops the run (the station refuses a board that came back after a flash).
    private let uidCheck: @Sendable (String) throws -> Void

    public init(source: any TegraDeviceSource, inputs: TegraFlashInputs,
                timeoutMilliseconds: Int = USBTransferRules.defaultTimeoutMilliseconds,
                reenumerationTimeoutSeconds: Double = 10,
                progress: @escaping @Sendable (TegraPhase, Double) -> Void = { _, _ in },
                uidCheck: @escaping @Sendable (String) throws -> Void = { _ in }) {
        self.source = source
        self.inputs = inputs
        self.timeoutMilliseconds = timeoutMilliseconds
        self.reenumerationTimeoutSeconds = reenumerationTimeoutSeconds
        self.uidCheck = uidCheck
        self.progress = progress
    }

    public func cancel() { cancelled.store(true, ordering: .relaxed) }

    private var isCancelled: Bool { cancelled.load(ordering: .relaxed) }

    private func checkCancelled(_ phase: TegraPhase) throws {
        if isCancelled { throw TegraError(.cancelled, "cancelled before phase \(phase)") }
    }

    public func run() throws -> TegraFlashReport {
        let started = Date()
        // Everything that can be refused offline is refused before the board is touched:
        // the boot image, and the payload as it will be but for the board's UID.
        _ = try inputs.bootImage()
        try FlasherPayload.check(inputs)
        progress(.rcm, 0)
        let bringUp = try MiniloaderBringUp(source: source, chip: inputs.chip, productIDs: inputs.usbProductIDs,
                                            miniloader: inputs.miniloader, miniloaderEntry: inputs.miniloaderEntry,
                                            timeoutMilliseconds: timeoutMilliseconds,
                                            reenumerationTimeoutSeconds: reenumerationTimeoutSeconds,
                                            shouldStop: { [self] in self.isCancelled },
                                            uidCheck: uidCheck, progress: progress)
        let transport = bringUp.transport
        defer { transport.close() }
        let session = bringUp.session
        let info = bringUp.platformInfo
        try info.checkFlashable()
        let uid = bringUp.uid

        try checkCancelled(.bct)
        progress(.bct, 0)
        try session.downloadBCT(inputs.usbBCT) { [progress] in progress(.bct, $0) }

        try checkCancelled(.bootloader)
        let payload = try FlasherPayload(inputs: inputs, environment: inputs.substitutedEnvironment(uid: uid))
        progress(.bootloader, 0)
        try session.downloadBootloader(payload.bytes, loadAddress: inputs.loadAddress, entry: inputs.loadAddress) {
            [progress] in progress(.bootloader, $0)
        }
        // From here the flasher U-Boot runs on its own; only its serial console shows the rest.
        progress(.flashingOnDevice, 0)
        return TegraFlashReport(uid: uid, chip: inputs.chip, rcmVersion: bringUp.rcmVersion,
                                miniloaderWasRunning: bringUp.miniloaderWasRunning, platformInfo: info,
                                bootloaderBytes: payload.bytes.count, flashImageBytes: payload.flashImage.count,
                                flashImageCRC32: CRC32.checksum(payload.flashImage), script: payload.script,
                                seconds: Date().timeIntervalSince(started))
    }

    /// Platform info of a board in recovery mode (`provision tegra info`): needs the miniloader,
    /// because only the miniloader answers nv3p. Leaves the board with the miniloader running.
    public static func platformInfo(source: any TegraDeviceSource, chip: TegraChip, miniloader: [UInt8],
                                    miniloaderEntry: UInt32? = nil,
                                    timeoutMilliseconds: Int = USBTransferRules.defaultTimeoutMilliseconds,
                                    reenumerationTimeoutSeconds: Double = 10) throws -> (uid: String, info: TegraPlatformInfo) {
        let bringUp = try MiniloaderBringUp(source: source, chip: chip, productIDs: [], miniloader: miniloader,
                                            miniloaderEntry: miniloaderEntry ?? chip.miniloaderEntry,
                                            timeoutMilliseconds: timeoutMilliseconds,
                                            reenumerationTimeoutSeconds: reenumerationTimeoutSeconds,
                                            shouldStop: { false }, uidCheck: { _ in }, progress: { _, _ in })
        defer { bringUp.transport.close() }
        return (bringUp.uid, bringUp.platformInfo)
    }
}

/// Opens the device and gets the miniloader running, whatever state an earlier program left
/// the board in, and reads the platform info:
/// - the boot ROM sends its UID: RCM version query, miniloader, re-enumeration;
/// - no UID, and the miniloader answers nv3p: it already runs (after `tegra info --profile`,
///   or a flash that stopped after the miniloader);
/// - no UID, and a 4-byte boot ROM word answers the nv3p request: the boot ROM runs but gave its
///   UID to an earlier program (`tegra info` without a profile, an interrupted attempt), so RCM
///   goes ahead without it and the UID comes from the platform info.
struct MiniloaderBringUp {
    let transport: any USBTransport
    let session: Nv3pSession
    let platformInfo: TegraPlatformInfo
    /// The chip UID as hex (from the boot ROM, or the platform info when the boot ROM withheld it).
    let uid: String
    let rcmVersion: UInt32?
    let miniloaderWasRunning: Bool

    init(source: any TegraDeviceSource, chip: TegraChip, productIDs: [UInt16], miniloader: [UInt8],
         miniloaderEntry: UInt32, timeoutMilliseconds: Int, reenumerationTimeoutSeconds: Double,
         shouldStop: @escaping () -> Bool, uidCheck: (String) throws -> Void,
         progress: (TegraPhase, Double) -> Void) throws {
        var transport = try source.open()
        var handedOver = false
        defer { if !handedOver { transport.close() } }

        guard let deviceChip = transport.chip, deviceChip == chip,
              productIDs.isEmpty || productIDs.contains(transport.productID) else {
            let found = transport.chip.map { "\($0)" } ?? "an unknown chip"
            throw TegraError(.invalidInput,
                "\(transport.location) is \(found) (product id 0x\(String(transport.productID, radix: 16))); "
                + "the profile is for \(chip)" + (productIDs.isEmpty ? "" : " with product ids \(productIDs.map { "0x" + String($0, radix: 16) }.joined(separator: ", "))"))
        }
        let rom = BootROMSession(transport: transport, chip: chip, timeoutMilliseconds: timeoutMilliseconds)
        let romUID = try rom.readUID()
        if let romUID { try uidCheck(romUID.hexString) }

        var session = Nv3pSession(transport: transport, timeoutMilliseconds: timeoutMilliseconds, shouldStop: shouldStop)
        var info: TegraPlatformInfo?
        var bootROMRuns = romUID != nil
        if romUID == nil {
            do {
                info = try session.getPlatformInfo()
            } catch let error as TegraError {
                guard case .bootROMAnswered = error.kind else { throw error }
                bootROMRuns = true
            }
        }
        var rcmVersion: UInt32?
        if bootROMRuns {
            rcmVersion = try rom.queryRCMVersion()
            progress(.rcm, 1)
            if shouldStop() { throw TegraError(.cancelled, "\(transport.location): cancelled before the miniloader") }
            progress(.miniloader, 0)
            try rom.sendMiniloader(miniloader, entry: miniloaderEntry, shouldStop: shouldStop) { progress(.miniloader, $0) }
            // The miniloader takes over USB: the device drops off and comes back.
            transport.close()
            handedOver = true
            transport = try source.reopenAfterReenumeration(timeoutSeconds: reenumerationTimeoutSeconds)
            handedOver = false
            session = Nv3pSession(transport: transport, timeoutMilliseconds: timeoutMilliseconds, shouldStop: shouldStop)
            info = try session.getPlatformInfo()
        } else {
            progress(.rcm, 1)
            progress(.miniloader, 1)
        }
        guard let info else { throw TegraError(.protocolViolation, "\(transport.location): no platform info") }
        // The platform info carries 16 UID bytes; T20/T30 boot ROMs send 8, taken to be its first
        // 8 (inferred, not observed), so that one board keeps one identity either way.
        let uid = romUID?.hexString ?? Array(info.uid.prefix(chip.uidLength)).hexString
        if romUID == nil { try uidCheck(uid) }
        self.transport = transport
        self.session = session
        self.platformInfo = info
        self.uid = uid
        self.rcmVersion = rcmVersion
        self.miniloaderWasRunning = !bootROMRuns
        handedOver = true
    }
}

/// What `probe` learns from the boot ROM without starting anything on the board.
public struct TegraProbeResult: Sendable {
    public let location: String
    public let productID: UInt16
    public let chip: TegraChip
    /// The chip UID: from the boot ROM, or from the miniloader's platform info when it runs;
    /// nil when the boot ROM runs but gave its UID to an earlier program.
    public let uid: String?
    /// The boot ROM's answer to the (zero-key signed) RCM version query; nil when the miniloader runs.
    public let rcmVersion: UInt32?
    /// The miniloader (not the boot ROM) answered.
    public let miniloaderRunning: Bool
}

extension TegraFlasher {
    /// Reads the UID and asks the RCM version: proves the board is in recovery and accepts
    /// zero-key CMAC messages. The board stays in the boot ROM (nothing is executed).
    public static func probe(source: any TegraDeviceSource,
                             timeoutMilliseconds: Int = USBTransferRules.defaultTimeoutMilliseconds) throws -> TegraProbeResult {
        let transport = try source.open()
        defer { transport.close() }
        guard let chip = transport.chip else {
            throw TegraError(.invalidInput, "\(transport.location) is not a supported Tegra (product id 0x\(String(transport.productID, radix: 16)))")
        }
        let rom = BootROMSession(transport: transport, chip: chip, timeoutMilliseconds: timeoutMilliseconds)
        func result(uid: String?, version: UInt32?, miniloader: Bool) -> TegraProbeResult {
            TegraProbeResult(location: transport.location, productID: transport.productID, chip: chip, uid: uid,
                             rcmVersion: version, miniloaderRunning: miniloader)
        }
        if let uid = try rom.readUID() {
            return result(uid: uid.hexString, version: try rom.queryRCMVersion(), miniloader: false)
        }
        // No UID: either the miniloader runs, or the boot ROM already gave its UID away.
        do {
            let info = try Nv3pSession(transport: transport, timeoutMilliseconds: timeoutMilliseconds).getPlatformInfo()
            return result(uid: Array(info.uid.prefix(chip.uidLength)).hexString, version: nil, miniloader: true)
        } catch let error as TegraError {
            guard case .bootROMAnswered = error.kind else { throw error }
            return result(uid: nil, version: try rom.queryRCMVersion(), miniloader: false)
        }
    }
}
