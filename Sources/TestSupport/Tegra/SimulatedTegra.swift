import Foundation
import Synchronization
import Tegra

/// A Tegra boot ROM and miniloader behind `USBTransport`, strict about every rule of
/// tegra-rcm.md, and able to misbehave on request. The one simulated part of the project:
/// no USB bus exists on the build machines.
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
        /// The device drops off the bus after taking this many bytes of the step's upload.
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
    }

    public let chip: TegraChip
    public let productID: UInt16
    public let uid: [UInt8]
    let faults: [Fault]
    let state: Mutex<SimulatorState>

    public init(chip: TegraChip = .t124, productID: UInt16 = 0x7140,
                uid: [UInt8] = Array(0x10...0x1F), faults: [Fault] = []) {
        self.chip = chip
        self.productID = productID
        self.uid = Array(uid.prefix(chip.uidLength))
        self.faults = faults
        state = Mutex(SimulatorState(mode: faults.contains(.miniloaderAlreadyRunning) ? .miniloader : .bootROM))
    }

    public var record: Record { state.withLock { $0.record } }

    /// The device source a flasher uses to open this board.
    public var source: SimulatedTegraSource { SimulatedTegraSource(device: self) }

    func fault(where match: (Fault) -> Bool) -> Fault? { faults.first(where: match) }
    func has(_ fault: Fault) -> Bool { faults.contains(fault) }

    // MARK: connections

    func connect() throws -> SimulatedTransport {
        try state.withLock { state in
            guard state.mode != .gone else {
                throw TegraError(.noDevice, "no Tegra device in recovery mode found (simulated board is off the bus)")
            }
            state.record.opens += 1
            state.generation += 1
            state.incoming = []
            state.outgoing = []
            state.transferSizes = []
            if state.mode == .bootROM && !state.uidSent {
                state.uidSent = true
                let length = faults.compactMap { if case let .uidLength(n) = $0 { n } else { nil } }.first ?? uid.count
                state.outgoing.append(Array((uid + [UInt8](repeating: 0xAB, count: 32)).prefix(length)))
            }
            return SimulatedTransport(device: self, generation: state.generation, productID: productID)
        }
    }

    func out(_ bytes: [UInt8], generation: Int) throws -> Int {
        try state.withLock { state in
            guard state.generation == generation, state.mode != .gone else {
                throw TegraError(.deviceGone, "simulated device is gone (re-enumerated or unplugged)")
            }
            guard bytes.count <= USBTransferRules.maxTransferLength else {
                state.record.violations.append("bulk OUT transfer of \(bytes.count) bytes (> 4096)")
                throw TegraError(.usb(-9), "simulated device stalled a \(bytes.count)-byte transfer")
            }
            switch state.mode {
            case .bootROM: try bootROMReceive(bytes, &state)
            case .miniloader: try miniloaderReceive(bytes, &state)
            case .bootloaderRunning:
                state.record.violations.append("bulk OUT after the bootloader started")
            case .reenumerating, .gone:
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
                    state.mode = .miniloader
                    state.record.reenumerations += 1
                }
                return state.mode == .miniloader
            }
            if ready { return try connect() }
            Thread.sleep(forTimeInterval: 0.01)
        } while Date() < deadline
        throw TegraError(.reenumerationTimeout,
            "the simulated device did not come back within \(timeoutSeconds) s after the miniloader started")
    }

    /// Takes the device off the bus mid-transfer.
    func unplug(_ state: inout SimulatorState) {
        state.mode = .gone
        state.outgoing = []
    }
}

/// Mutable simulator state, only touched under the lock.
struct SimulatorState: Sendable {
    enum Mode: Sendable { case bootROM, reenumerating, miniloader, bootloaderRunning, gone }
    var mode: Mode
    var generation = 0
    var uidSent = false
    var reenumerateWhenDrained = false
    var incoming: [UInt8] = []
    var transferSizes: [Int] = []
    var outgoing: [[UInt8]] = []
    var record = SimulatedTegra.Record()
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
