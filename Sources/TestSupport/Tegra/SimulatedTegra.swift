import Foundation
import Synchronization
import Tegra

/// A Tegra boot ROM and miniloader behind `USBTransport`, strict about every rule of
/// tegra-rcm.md and checking the host with code of its own (`SimulatedChipSpec`,
/// `SimulatorCrypto`, its own nv3p parser), and able to misbehave on request. The one
/// simulated part of the project: no USB bus exists on the build machines.
///
/// Like the real target, it pads some device packets and splits others over two transfers
/// (unless `.plainDevicePackets`), so every flow the tests run meets both.
public final class SimulatedTegra: Sendable {
    /// Points in the flow where a fault can strike.
    public enum Step: Sendable, Equatable {
        case rcmVersionReply, miniloaderUpload, miniloaderReply, platformInfo, bctStatus, bootloaderStatus, bootloaderData
    }

    public enum Fault: Sendable, Equatable {
        /// The device stops answering at this step (the host's read times out).
        case silentAt(Step)
        /// The miniloader answers this nv3p command with NACK(code).
        case nack(command: UInt32, code: UInt32)
        /// The miniloader's STATUS after this command carries `code`.
        case badStatus(command: UInt32, code: UInt32)
        /// The device drops off the bus after taking this many bytes of the step's upload
        /// (once: after `replug()` the board behaves).
        case disconnect(Step, afterBytes: Int)
        /// The boot ROM sends a UID of this length.
        case uidLength(Int)
        /// Secure boot fused: no zero-key CMAC verifies.
        case secureBoot
        /// The miniloader never comes back after re-enumeration.
        case neverReenumerates
        /// Platform info reports this operating mode.
        case operatingMode(UInt32)
        /// The platform info DATA packet carries a wrong checksum.
        case corruptPlatformInfoChecksum
        /// The board is already running the miniloader (no UID on the first read).
        case miniloaderAlreadyRunning
        /// The boot ROM's UID was read by an earlier program: none comes on open.
        case withholdUID
        /// The boot ROM sends its UID again on every open.
        case resendUID
        /// Device packets come whole, one per transfer, never padded.
        case plainDevicePackets
        /// The miniloader enumerates with this product id (same chip byte, other high byte).
        case productIDAfterReenumeration(UInt16)
        /// Whatever boot0 holds, the board does not start (as with SDRAM settings that do not fit it).
        case neverBoots
    }

    /// What the simulator saw, for the tests to check.
    public struct Record: Sendable {
        public var rcmMessages: [(opcode: UInt32, transferSizes: [Int])] = []
        public var miniloader: [UInt8]?
        public var miniloaderEntry: UInt32?
        public var bct: [UInt8]?
        public var bootloader: [UInt8]?
        public var bootloaderLoadAddress: UInt32?
        public var bootloaderEntry: UInt32?
        public var nv3pCommands: [UInt32] = []
        public var hostDataPacketLengths: [Int] = []
        public var violations: [String] = []
        public var reenumerations = 0
        public var opens = 0
        public var uidsSent = 0
        /// Transfers the boot ROM got that are not RCM messages (a host probing for the miniloader).
        public var nonRCMInBootROM = 0
        public var paddedPackets = 0
        public var splitPackets = 0
        /// eMMC boot0 after `resetAfterFlash()`, and whether the boot ROM could boot from it.
        public var eMMCBoot0: [UInt8]?
        public var bootVerdict: SimulatedBootVerdict?
    }

    /// Bulk transfers of at most 4096 bytes (tegra-rcm.md, "Finding the device").
    static let maxTransfer = 4096

    public let chip: TegraChip
    public let spec: SimulatedChipSpec
    public let productID: UInt16
    public let uid: [UInt8]
    let faults: [Fault]
    let state: Mutex<SimulatorState>

    public init(chip: TegraChip = .t124, productID: UInt16 = 0x7140,
                uid: [UInt8] = Array(0x10...0x1F), faults: [Fault] = []) {
        self.chip = chip
        self.spec = SimulatedChipSpec.of(chip)
        self.productID = productID
        self.uid = Array(uid.prefix(spec.uidLength))
        self.faults = faults
        state = Mutex(SimulatorState(mode: faults.contains(.miniloaderAlreadyRunning) ? .miniloader : .bootROM))
    }

    public var record: Record { state.withLock { $0.record } }

    /// The device source a flasher uses to open this board.
    public var source: SimulatedTegraSource { SimulatedTegraSource(device: self) }

    func has(_ fault: Fault) -> Bool { faults.contains(fault) }

    // MARK: the board, from outside

    /// The operator plugs the board back in after an unplug (or holds FORCE RECOVERY and presses
    /// RESET): a fresh boot ROM, UID not yet sent, every old connection dead.
    public func replug() {
        state.withLock { state in
            state.generation += 1
            state.mode = .bootROM
            state.uidSent = false
            state.resetTransfers()
            state.resetNv3p()
            state.bctReceived = false
        }
    }

    /// The flasher U-Boot has written boot0 and resets the board: the boot ROM reads boot0 and
    /// either boots U-Boot (the board leaves USB) or falls back to recovery mode (a fresh boot
    /// ROM on USB, as a board with an unbootable BCT does). Returns whether it booted.
    @discardableResult
    public func resetAfterFlash() -> Bool {
        state.withLock { state in
            guard state.mode == .bootloaderRunning, let payload = state.record.bootloader,
                  let load = state.record.bootloaderLoadAddress else {
                state.record.bootVerdict = .fellBackToRecovery("no flasher bootloader ran")
                return false
            }
            var (image, verdict) = SimulatedBootImageCheck.flashAndBoot(payload: payload, loadAddress: load, chip: chip)
            if has(.neverBoots), case .booted = verdict { verdict = .fellBackToRecovery("the board does not start from this BCT (simulated)") }
            state.record.eMMCBoot0 = image
            state.record.bootVerdict = verdict
            state.generation += 1
            state.resetTransfers()
            state.resetNv3p()
            if case .booted = verdict {
                state.mode = .gone
                return true
            }
            state.mode = .bootROM
            state.uidSent = false
            return false
        }
    }

    /// The boot ROM's verdict on a boot0 image, for tests that hold an image in hand.
    public static func bootVerdict(forBoot0 image: [UInt8]) -> SimulatedBootVerdict { SimulatedBootImageCheck.boot(image) }

    /// Whether this disconnect fault fires now (each fires once).
    func disconnectLimit(_ step: Step, _ state: inout SimulatorState) -> Int? {
        guard !state.disconnectFired.contains(where: { $0 == step }),
              let limit = faults.compactMap({ if case let .disconnect(s, n) = $0, s == step { n } else { nil } }).first else { return nil }
        return limit
    }

    // MARK: connections

    func connect() throws -> SimulatedTransport {
        try state.withLock { state in
            guard state.mode == .bootROM || state.mode == .miniloader || state.mode == .reenumerated else {
                throw TegraError(.noDevice, "no Tegra device in recovery mode found (simulated board is off the bus)")
            }
            var product = productID
            if state.mode == .reenumerated {
                state.mode = .miniloader
                if let other = faults.compactMap({ if case let .productIDAfterReenumeration(p) = $0 { p } else { nil } }).first {
                    product = other
                }
            }
            state.record.opens += 1
            state.generation += 1
            state.resetTransfers()
            // A new connection is a new host session: its sequence starts again at 0.
            state.resetNv3p()
            if state.mode == .bootROM && !has(.withholdUID) && (!state.uidSent || has(.resendUID)) {
                state.uidSent = true
                state.record.uidsSent += 1
                let length = faults.compactMap { if case let .uidLength(n) = $0 { n } else { nil } }.first ?? uid.count
                state.outgoing.append(Array((uid + [UInt8](repeating: 0xAB, count: 32)).prefix(length)))
            }
            return SimulatedTransport(device: self, generation: state.generation, productID: product)
        }
    }

    func out(_ bytes: [UInt8], generation: Int) throws -> Int {
        try state.withLock { state in
            guard state.generation == generation, state.mode != .gone else {
                throw TegraError(.deviceGone, "simulated device is gone (re-enumerated or unplugged)")
            }
            guard bytes.count <= SimulatedTegra.maxTransfer else {
                state.record.violations.append("bulk OUT transfer of \(bytes.count) bytes (> 4096)")
                throw TegraError(.usb(-9), "simulated device stalled a \(bytes.count)-byte transfer")
            }
            switch state.mode {
            case .bootROM: try bootROMReceive(bytes, &state)
            case .miniloader: try miniloaderReceive(bytes, &state)
            case .bootloaderRunning:
                state.record.violations.append("bulk OUT after the bootloader started")
            case .reenumerating, .reenumerated, .gone:
                throw TegraError(.deviceGone, "simulated device is gone")
            }
            return bytes.count
        }
    }

    func input(maxLength: Int, generation: Int, timeoutMilliseconds: Int) throws -> [UInt8] {
        try state.withLock { state in
            guard state.generation == generation, state.mode != .gone else {
                throw TegraError(.deviceGone, "simulated device is gone (re-enumerated or unplugged)")
            }
            guard !state.outgoing.isEmpty else {
                // A real read would block for the timeout; the answer is the same, without the wait.
                throw TegraError(.timeout, "simulated device: no answer within \(timeoutMilliseconds) ms")
            }
            var next = state.outgoing.removeFirst()
            if next.count > maxLength {
                state.outgoing.insert(Array(next[maxLength...]), at: 0)
                next = Array(next.prefix(maxLength))
            }
            // The miniloader takes over USB once the boot ROM's last answer has been read.
            if state.reenumerateWhenDrained && state.outgoing.isEmpty {
                state.reenumerateWhenDrained = false
                state.mode = .reenumerating
            }
            return next
        }
    }

    func waitForReenumeration(timeoutSeconds: Double) throws -> SimulatedTransport {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        repeat {
            let ready = state.withLock { state -> Bool in
                if state.mode == .reenumerating && !has(.neverReenumerates) {
                    state.mode = .reenumerated
                    state.record.reenumerations += 1
                }
                return state.mode == .reenumerated || state.mode == .miniloader
            }
            if ready { return try connect() }
            Thread.sleep(forTimeInterval: 0.01)
        } while Date() < deadline
        throw TegraError(.reenumerationTimeout,
            "the simulated device did not come back within \(timeoutSeconds) s after the miniloader started")
    }

    /// Takes the device off the bus mid-transfer.
    func unplug(_ state: inout SimulatorState, at step: Step) {
        state.disconnectFired.append(step)
        state.mode = .gone
        state.outgoing = []
    }

    /// Queues one nv3p device packet: every third padded with 8 zero bytes, every third split
    /// over two transfers inside its header, the rest whole (unless `.plainDevicePackets`).
    func sendDevicePacket(_ packet: [UInt8], _ state: inout SimulatorState) {
        state.devicePackets += 1
        guard !has(.plainDevicePackets) else { state.outgoing.append(packet); return }
        switch state.devicePackets % 3 {
        case 1:
            state.record.paddedPackets += 1
            state.outgoing.append(packet + [UInt8](repeating: 0, count: 8))
        case 2:
            state.record.splitPackets += 1
            state.outgoing.append(Array(packet.prefix(10)))
            state.outgoing.append(Array(packet.dropFirst(10)))
        default:
            state.outgoing.append(packet)
        }
    }
}

/// Mutable simulator state, only touched under the lock.
struct SimulatorState: Sendable {
    enum Mode: Sendable { case bootROM, reenumerating, reenumerated, miniloader, bootloaderRunning, gone }
    var mode: Mode
    var generation = 0
    var uidSent = false
    var reenumerateWhenDrained = false
    var incoming: [UInt8] = []
    var transferSizes: [Int] = []
    var outgoing: [[UInt8]] = []
    var record = SimulatedTegra.Record()
    var devicePackets = 0
    var disconnectFired: [SimulatedTegra.Step] = []
    // nv3p
    var expectedHostSequence: UInt32 = 0
    var deviceSequence: UInt32 = 0
    var awaitingAckFor: UInt32?
    var afterAck: [[UInt8]] = []
    var afterAckAction: NV3PAfterAck = .none
    var receiving: NV3PUpload?
    var bctReceived = false
    var pendingStatusCode: UInt32 = 0
    var pendingBootloaderLength = 0

    mutating func resetTransfers() {
        incoming = []
        outgoing = []
        transferSizes = []
        reenumerateWhenDrained = false
    }

    mutating func resetNv3p() {
        expectedHostSequence = 0
        awaitingAckFor = nil
        afterAck = []
        afterAckAction = .none
        receiving = nil
    }
}

enum NV3PAfterAck: Sendable { case none, startBootloaderData }

struct NV3PUpload: Sendable {
    enum Purpose: Sendable { case bct, bootloader }
    var purpose: Purpose
    var remaining: Int
    var bytes: [UInt8] = []
}

/// The simulated board as a `TegraDeviceSource`.
public struct SimulatedTegraSource: TegraDeviceSource {
    let device: SimulatedTegra
    public func open() throws -> any USBTransport { try device.connect() }
    public func reopenAfterReenumeration(timeoutSeconds: Double) throws -> any USBTransport {
        try device.waitForReenumeration(timeoutSeconds: timeoutSeconds)
    }
}

/// One connection to the simulated board; dead once the board re-enumerates or is unplugged.
public final class SimulatedTransport: USBTransport, @unchecked Sendable {
    let device: SimulatedTegra
    let generation: Int
    public let productID: UInt16
    public var location: String { "simulated \(String(format: "0955:%04x", productID))" }
    private var closed = false

    init(device: SimulatedTegra, generation: Int, productID: UInt16) {
        self.device = device
        self.generation = generation
        self.productID = productID
    }

    public func bulkOut(_ bytes: ArraySlice<UInt8>, timeoutMilliseconds: Int) throws -> Int {
        guard !closed else { throw TegraError(.deviceGone, "\(location): closed") }
        return try device.out(Array(bytes), generation: generation)
    }

    public func bulkIn(maxLength: Int, timeoutMilliseconds: Int) throws -> [UInt8] {
        guard !closed else { throw TegraError(.deviceGone, "\(location): closed") }
        return try device.input(maxLength: maxLength, generation: generation, timeoutMilliseconds: timeoutMilliseconds)
    }

    public func close() { closed = true }
}
