import Tegra

/// nv3p as the simulated miniloader reads and writes it, from tegra-rcm.md with its own code
/// (not the host's `Nv3p`/`Nv3pReceivedPacket`).
enum SimulatedNv3p {
    static let command: UInt32 = 1, data: UInt32 = 2, ack: UInt32 = 4, nack: UInt32 = 5

    static func packet(type: UInt32, sequence: UInt32, body: [UInt8]) -> [UInt8] {
        var bytes = simulatorBytes(1) + simulatorBytes(type) + simulatorBytes(sequence) + body
        let sum = bytes.reduce(UInt32(0)) { $0 &+ UInt32($1) }
        bytes += simulatorBytes(0 &- sum)
        return bytes
    }

    static func ackPacket(_ sequence: UInt32) -> [UInt8] { packet(type: ack, sequence: sequence, body: []) }
    static func nackPacket(_ code: UInt32, _ sequence: UInt32) -> [UInt8] { packet(type: nack, sequence: sequence, body: simulatorBytes(code)) }
    static func dataPacket(_ payload: [UInt8], _ sequence: UInt32) -> [UInt8] {
        packet(type: data, sequence: sequence, body: simulatorBytes(UInt32(payload.count)) + payload)
    }

    /// STATUS: a CMD 0x0A with char msg[32], u32 code, u32 flags.
    static func statusPacket(code: UInt32, _ sequence: UInt32) -> [UInt8] {
        var text = Array((code == 0 ? "ok" : "simulated failure \(code)").utf8.prefix(31))
        text += [UInt8](repeating: 0, count: 32 - text.count)
        let args = text + simulatorBytes(code) + simulatorBytes(0)
        return packet(type: command, sequence: sequence, body: simulatorBytes(UInt32(args.count)) + simulatorBytes(0x0A) + args)
    }

    /// The length a host packet announces once its header is in, or nil while it is not.
    static func length(_ bytes: [UInt8]) -> Int? {
        guard bytes.count >= 8 else { return nil }
        switch simulatorWord(bytes, 4) {
        case ack: return 16
        case nack: return 20
        case command, data: return bytes.count >= 16 ? 24 - (simulatorWord(bytes, 4) == data ? 4 : 0) + Int(simulatorWord(bytes, 12)) : nil
        default: return bytes.count
        }
    }

    struct Parsed {
        let type: UInt32
        let sequence: UInt32
        let body: [UInt8]
    }

    static func parse(_ raw: [UInt8]) throws -> Parsed {
        func fail(_ what: String) -> SimulatorViolation { SimulatorViolation("host nv3p packet of \(raw.count) bytes: \(what)") }
        guard raw.count >= 16 else { throw fail("shorter than 16 bytes") }
        guard simulatorWord(raw, 0) == 1 else { throw fail("version \(simulatorWord(raw, 0))") }
        let type = simulatorWord(raw, 4)
        guard [command, data, ack, nack].contains(type) else { throw fail("type \(type)") }
        guard length(raw) == raw.count else { throw fail("announces \(length(raw) ?? -1) bytes") }
        let sum = raw.dropLast(4).reduce(UInt32(0)) { $0 &+ UInt32($1) } &+ simulatorWord(raw, raw.count - 4)
        guard sum == 0 else { throw fail("checksum off by \(sum)") }
        return Parsed(type: type, sequence: simulatorWord(raw, 8), body: Array(raw[12..<(raw.count - 4)]))
    }
}

/// The miniloader's half: nv3p packets checked (checksum, sequence, lengths) and answered.
extension SimulatedTegra {
    func miniloaderReceive(_ bytes: [UInt8], _ state: inout SimulatorState) throws {
        if let upload = state.receiving, upload.purpose == .bootloader,
           let limit = disconnectLimit(.bootloaderData, &state),
           upload.bytes.count + state.incoming.count + bytes.count >= limit {
            unplug(&state, at: .bootloaderData)
            throw TegraError(.deviceGone, "simulated device unplugged during the bootloader download")
        }
        state.incoming += bytes
        while let packetLength = SimulatedNv3p.length(state.incoming), state.incoming.count >= packetLength {
            let raw = Array(state.incoming.prefix(packetLength))
            state.incoming.removeFirst(packetLength)
            handle(raw, &state)
        }
    }

    private func handle(_ raw: [UInt8], _ state: inout SimulatorState) {
        let packet: SimulatedNv3p.Parsed
        do {
            packet = try SimulatedNv3p.parse(raw)
        } catch {
            state.record.violations.append("\(error)")
            sendDevicePacket(SimulatedNv3p.nackPacket(3, raw.count >= 12 ? simulatorWord(raw, 8) : 0), &state)
            return
        }
        switch packet.type {
        case SimulatedNv3p.ack:
            guard let awaited = state.awaitingAckFor, awaited == packet.sequence else {
                state.record.violations.append("host ACK with sequence \(packet.sequence), awaiting \(String(describing: state.awaitingAckFor))")
                return
            }
            state.awaitingAckFor = nil
            if !state.afterAck.isEmpty {
                sendAwaitingAck(state.afterAck.removeFirst(), &state)
            } else if state.afterAckAction == .startBootloaderData {
                state.afterAckAction = .none
                state.receiving = NV3PUpload(purpose: .bootloader, remaining: state.pendingBootloaderLength)
            }
        case SimulatedNv3p.command, SimulatedNv3p.data:
            guard packet.sequence == state.expectedHostSequence else {
                state.record.violations.append("host packet sequence \(packet.sequence), expected \(state.expectedHostSequence)")
                sendDevicePacket(SimulatedNv3p.nackPacket(3, packet.sequence), &state)
                return
            }
            if let awaited = state.awaitingAckFor {
                state.record.violations.append("host sent a new packet before ACKing device packet \(awaited)")
            }
            state.expectedHostSequence &+= 1
            if packet.type == SimulatedNv3p.command {
                guard packet.body.count >= 8 else {
                    state.record.violations.append("command packet without a command word")
                    return
                }
                command(simulatorWord(packet.body, 4), args: Array(packet.body[8...]), sequence: packet.sequence, &state)
            } else {
                received(Array(packet.body[4...]), sequence: packet.sequence, &state)
            }
        default:
            state.record.violations.append("host sent packet type \(packet.type)")
        }
    }

    private func command(_ code: UInt32, args: [UInt8], sequence: UInt32, _ state: inout SimulatorState) {
        state.record.nv3pCommands.append(code)
        if let nack = faults.compactMap({ if case let .nack(c, n) = $0, c == code { n } else { nil } }).first {
            sendDevicePacket(SimulatedNv3p.nackPacket(nack, sequence), &state)
            return
        }
        let statusCode: UInt32 = faults.compactMap { fault -> UInt32? in if case let .badStatus(c, s) = fault, c == code { s } else { nil } }.first ?? 0
        let expectedArgs: [UInt32: Int] = [0x01: 0, 0x04: 4, 0x06: 16]
        guard let wanted = expectedArgs[code] else {
            sendDevicePacket(SimulatedNv3p.nackPacket(2, sequence), &state)
            return
        }
        guard args.count == wanted else {
            state.record.violations.append("command \(code) with \(args.count) argument bytes, expected \(wanted)")
            sendDevicePacket(SimulatedNv3p.nackPacket(2, sequence), &state)
            return
        }
        switch code {
        case 0x01:
            if has(.silentAt(.platformInfo)) { return }
            sendDevicePacket(SimulatedNv3p.ackPacket(sequence), &state)
            var data = SimulatedNv3p.dataPacket(platformInfo(), nextDeviceSequence(&state))
            if has(.corruptPlatformInfoChecksum) { data[data.count - 1] ^= 0x5A }
            state.awaitingAckFor = simulatorWord(data, 8)
            sendDevicePacket(data, &state)
            state.afterAck = [SimulatedNv3p.statusPacket(code: statusCode, nextDeviceSequence(&state))]
        case 0x04:
            sendDevicePacket(SimulatedNv3p.ackPacket(sequence), &state)
            state.receiving = NV3PUpload(purpose: .bct, remaining: Int(simulatorWord(args, 0)))
            state.pendingStatusCode = statusCode
        default:  // 0x06 download bootloader
            sendDevicePacket(SimulatedNv3p.ackPacket(sequence), &state)
            let length = Int(simulatorWord(args, 0)) | Int(simulatorWord(args, 4)) << 32
            state.record.bootloaderLoadAddress = simulatorWord(args, 8)
            state.record.bootloaderEntry = simulatorWord(args, 12)
            if has(.silentAt(.bootloaderStatus)) { return }
            let code = state.bctReceived ? statusCode : 0x0B
            sendAwaitingAck(SimulatedNv3p.statusPacket(code: code, nextDeviceSequence(&state)), &state)
            if code == 0 {
                state.pendingBootloaderLength = length
                state.afterAckAction = .startBootloaderData
            }
        }
    }

    private func received(_ data: [UInt8], sequence: UInt32, _ state: inout SimulatorState) {
        state.record.hostDataPacketLengths.append(data.count)
        guard var upload = state.receiving else {
            state.record.violations.append("DATA packet nobody asked for")
            sendDevicePacket(SimulatedNv3p.nackPacket(3, sequence), &state)
            return
        }
        guard data.count <= 65_536, data.count <= upload.remaining else {
            state.record.violations.append("DATA packet of \(data.count) bytes with \(upload.remaining) remaining")
            sendDevicePacket(SimulatedNv3p.nackPacket(3, sequence), &state)
            return
        }
        if upload.purpose == .bootloader && has(.silentAt(.bootloaderData)) { return }
        sendDevicePacket(SimulatedNv3p.ackPacket(sequence), &state)
        upload.bytes += data
        upload.remaining -= data.count
        state.receiving = upload.remaining == 0 ? nil : upload
        guard upload.remaining == 0 else { return }
        switch upload.purpose {
        case .bct:
            state.record.bct = upload.bytes
            var code = state.pendingStatusCode
            if code == 0, let problem = SimulatedBootImageCheck.bctProblem(upload.bytes, chip: chip) {
                // The miniloader initialises SDRAM from this BCT: a broken one is refused.
                state.record.violations.append("BCT refused: \(problem)")
                code = 0x0C
            }
            state.bctReceived = code == 0
            if has(.silentAt(.bctStatus)) { return }
            sendAwaitingAck(SimulatedNv3p.statusPacket(code: code, nextDeviceSequence(&state)), &state)
        case .bootloader:
            state.record.bootloader = upload.bytes
            state.mode = .bootloaderRunning
        }
    }

    private func sendAwaitingAck(_ packet: [UInt8], _ state: inout SimulatorState) {
        state.awaitingAckFor = simulatorWord(packet, 8)
        sendDevicePacket(packet, &state)
    }

    private func nextDeviceSequence(_ state: inout SimulatorState) -> UInt32 {
        defer { state.deviceSequence &+= 1 }
        return state.deviceSequence
    }

    /// 72 bytes as a miniloader reports them (values chosen, layout per the spec).
    func platformInfo() -> [UInt8] {
        var info = [UInt8](repeating: 0, count: 72)
        func put(_ value: UInt32, _ offset: Int) { info.replaceSubrange(offset..<(offset + 4), with: simulatorBytes(value)) }
        let uid16 = Array((uid + [UInt8](repeating: 0, count: 16)).prefix(16))
        info.replaceSubrange(0..<16, with: uid16)
        info[16] = spec.productIDLowByte
        info[18] = 1
        put(0x7, 20)
        put(0x1, 24)
        put(2, 28)  // eMMC
        put(faults.compactMap { if case let .operatingMode(m) = $0 { m } else { nil } }.first ?? 3, 32)
        put(0x11, 36)
        put(0x22, 40)
        put(0x3, 44)
        put(0x0177, 56)
        return info
    }
}
