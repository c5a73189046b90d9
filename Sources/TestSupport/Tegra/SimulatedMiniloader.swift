import Tegra

/// The miniloader's half: nv3p packets checked (checksum, sequence, lengths) and answered.
extension SimulatedTegra {
    func miniloaderReceive(_ bytes: [UInt8], _ state: inout SimulatorState) throws {
        if let upload = state.receiving, upload.purpose == .bootloader,
           let limit = faults.compactMap({ if case let .disconnect(.bootloaderData, n) = $0 { n } else { nil } }).first,
           upload.bytes.count + state.incoming.count + bytes.count >= limit {
            unplug(&state)
            throw TegraError(.deviceGone, "simulated device unplugged during the bootloader download")
        }
        state.incoming += bytes
        while let packetLength = nextPacketLength(state.incoming), state.incoming.count >= packetLength {
            let raw = Array(state.incoming.prefix(packetLength))
            state.incoming.removeFirst(packetLength)
            handle(raw, &state)
        }
    }

    private func nextPacketLength(_ bytes: [UInt8]) -> Int? {
        guard bytes.count >= 8 else { return nil }
        switch bytes.loadWord(4) {
        case Nv3p.PacketType.ack.rawValue: return 16
        case Nv3p.PacketType.nack.rawValue: return 20
        case Nv3p.PacketType.command.rawValue: return bytes.count >= 16 ? 24 + Int(bytes.loadWord(12)) : nil
        case Nv3p.PacketType.data.rawValue: return bytes.count >= 16 ? 20 + Int(bytes.loadWord(12)) : nil
        default: return bytes.count  // garbage: take it all and complain
        }
    }

    private func handle(_ raw: [UInt8], _ state: inout SimulatorState) {
        let packet: Nv3pReceivedPacket
        do {
            packet = try Nv3pReceivedPacket(parsing: raw, from: "simulated miniloader")
        } catch {
            state.record.violations.append("\(error)")
            state.outgoing.append(Nv3p.nackPacket(code: 3, sequence: raw.count >= 12 ? raw.loadWord(8) : 0))
            return
        }
        switch packet.type {
        case .ack:
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
        case .command, .data:
            guard packet.sequence == state.expectedHostSequence else {
                state.record.violations.append("host packet sequence \(packet.sequence), expected \(state.expectedHostSequence)")
                state.outgoing.append(Nv3p.nackPacket(code: 3, sequence: packet.sequence))
                return
            }
            if state.awaitingAckFor != nil {
                state.record.violations.append("host sent a new packet before ACKing device packet \(state.awaitingAckFor!)")
            }
            state.expectedHostSequence &+= 1
            if let (code, args) = packet.command {
                command(code, args: args, sequence: packet.sequence, &state)
            } else if let data = packet.data {
                received(data, sequence: packet.sequence, &state)
            }
        case .nack, .encrypted:
            state.record.violations.append("host sent packet type \(packet.type.rawValue)")
        }
    }

    private func command(_ code: UInt32, args: [UInt8], sequence: UInt32, _ state: inout SimulatorState) {
        state.record.nv3pCommands.append(code)
        if let nack = faults.compactMap({ if case let .nack(c, n) = $0, c == code { n } else { nil } }).first {
            state.outgoing.append(Nv3p.nackPacket(code: nack, sequence: sequence))
            return
        }
        let statusCode: UInt32 = faults.compactMap { fault -> UInt32? in if case let .badStatus(c, s) = fault, c == code { s } else { nil } }.first ?? 0
        let expectedArgs: [UInt32: Int] = [0x01: 0, 0x04: 4, 0x06: 16]
        guard let wanted = expectedArgs[code] else {
            state.outgoing.append(Nv3p.nackPacket(code: 2, sequence: sequence))
            return
        }
        guard args.count == wanted else {
            state.record.violations.append("command \(code) with \(args.count) argument bytes, expected \(wanted)")
            state.outgoing.append(Nv3p.nackPacket(code: 2, sequence: sequence))
            return
        }
        switch code {
        case 0x01:
            if has(.silentAt(.platformInfo)) { return }
            state.outgoing.append(Nv3p.ackPacket(sequence: sequence))
            var data = Nv3p.dataPacket(platformInfo(), sequence: nextDeviceSequence(&state))
            if has(.corruptPlatformInfoChecksum) { data[data.count - 1] ^= 0x5A }
            state.awaitingAckFor = data.loadWord(8)
            state.outgoing.append(data)
            state.afterAck = [status(code: statusCode, &state)]
        case 0x04:
            state.outgoing.append(Nv3p.ackPacket(sequence: sequence))
            state.receiving = NV3PUpload(purpose: .bct, remaining: Int(args.loadWord(0)))
            state.pendingStatusCode = statusCode
        default:  // 0x06 download bootloader
            state.outgoing.append(Nv3p.ackPacket(sequence: sequence))
            let length = Int(args.loadWord(0)) | Int(args.loadWord(4)) << 32
            state.record.bootloaderLoadAddress = args.loadWord(8)
            state.record.bootloaderEntry = args.loadWord(12)
            if has(.silentAt(.bootloaderStatus)) { return }
            let code = state.bctReceived ? statusCode : 0x0B
            sendAwaitingAck(status(code: code, &state), &state)
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
            state.outgoing.append(Nv3p.nackPacket(code: 3, sequence: sequence))
            return
        }
        guard data.count <= Nv3p.dataPacketLength, data.count <= upload.remaining else {
            state.record.violations.append("DATA packet of \(data.count) bytes with \(upload.remaining) remaining")
            state.outgoing.append(Nv3p.nackPacket(code: 3, sequence: sequence))
            return
        }
        if upload.purpose == .bootloader && has(.silentAt(.bootloaderData)) { return }
        state.outgoing.append(Nv3p.ackPacket(sequence: sequence))
        upload.bytes += data
        upload.remaining -= data.count
        state.receiving = upload.remaining == 0 ? nil : upload
        guard upload.remaining == 0 else { return }
        switch upload.purpose {
        case .bct:
            state.record.bct = upload.bytes
            let code = state.pendingStatusCode
            state.bctReceived = code == 0
            if has(.silentAt(.bctStatus)) { return }
            sendAwaitingAck(status(code: code, &state), &state)
        case .bootloader:
            state.record.bootloader = upload.bytes
            state.mode = .bootloaderRunning
        }
    }

    private func sendAwaitingAck(_ packet: [UInt8], _ state: inout SimulatorState) {
        state.awaitingAckFor = packet.loadWord(8)
        state.outgoing.append(packet)
    }

    private func status(code: UInt32, _ state: inout SimulatorState) -> [UInt8] {
        let text = code == 0 ? "ok" : "simulated failure \(code)"
        return Nv3p.commandPacket(.status, args: Nv3p.statusArgs(message: text, code: code),
                                  sequence: nextDeviceSequence(&state))
    }

    private func nextDeviceSequence(_ state: inout SimulatorState) -> UInt32 {
        defer { state.deviceSequence &+= 1 }
        return state.deviceSequence
    }

    /// 72 bytes as a T124 miniloader reports them (values chosen, layout per the spec).
    func platformInfo() -> [UInt8] {
        var info = [UInt8](repeating: 0, count: Nv3p.platformInfoLength)
        func put(_ value: UInt32, _ offset: Int) {
            for i in 0..<4 { info[offset + i] = UInt8(value >> (8 * UInt32(i)) & 0xFF) }
        }
        let uid16 = Array((uid + [UInt8](repeating: 0, count: 16)).prefix(16))
        info.replaceSubrange(0..<16, with: uid16)
        info[16] = chip.productIDLowByte
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
