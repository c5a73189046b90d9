import Tegra

/// The boot ROM's half: RCM messages in 4096-byte pieces, checked, answered.
extension SimulatedTegra {
    /// What the simulated ROM answers to a message it rejects (the real code is not documented).
    public static let rejectionWord: UInt32 = 0x0000_0003

    func bootROMReceive(_ bytes: [UInt8], _ state: inout SimulatorState) throws {
        state.incoming += bytes
        state.transferSizes.append(bytes.count)
        guard state.incoming.count >= 4 else { return }
        let total = Int(state.incoming.loadWord(0))
        let version = chip.rcmVersion
        guard total >= RCMMessage.minimumLength + 4, total <= 4 << 20 else {
            state.record.violations.append("RCM message announces \(total) bytes")
            finishMessage(opcode: 0, &state, reply: Self.rejectionWord)
            return
        }
        if state.incoming.count >= version.opcodeOffset + 4, state.incoming.loadWord(version.opcodeOffset) == 0x4,
           let limit = faults.compactMap({ if case let .disconnect(.miniloaderUpload, n) = $0 { n } else { nil } }).first,
           state.incoming.count >= limit {
            unplug(&state)
            throw TegraError(.deviceGone, "simulated device unplugged during the miniloader upload")
        }
        if state.incoming.count < total {
            if bytes.count != USBTransferRules.maxTransferLength {
                state.record.violations.append("short bulk OUT piece of \(bytes.count) bytes in the middle of an RCM message")
            }
            return
        }
        guard state.incoming.count == total else {
            state.record.violations.append("\(state.incoming.count - total) bytes beyond the announced RCM message length")
            finishMessage(opcode: 0, &state, reply: Self.rejectionWord)
            return
        }
        let message: ReceivedRCMMessage
        do {
            message = try ReceivedRCMMessage(checking: state.incoming, version: version,
                                             cmacKeyIsZero: !has(.secureBoot))
        } catch let violation as SimulatorViolation {
            if !(violation.isSignatureFailure && has(.secureBoot)) {
                state.record.violations.append(violation.description)
            }
            finishMessage(opcode: state.incoming.loadWord(version.opcodeOffset), &state, reply: Self.rejectionWord)
            return
        }
        switch message.opcode {
        case RCMOpcode.rcmVersion.rawValue:
            finishMessage(opcode: message.opcode, &state,
                          reply: has(.silentAt(.rcmVersionReply)) ? nil : version.versionWord)
        case RCMOpcode.downloadExecute.rawValue:
            state.record.miniloader = message.payload
            state.record.miniloaderEntry = message.args[0]
            guard message.args[0] == chip.miniloaderEntry else {
                state.record.violations.append("miniloader entry \(String(message.args[0], radix: 16))")
                finishMessage(opcode: message.opcode, &state, reply: 1)
                return
            }
            if has(.silentAt(.miniloaderReply)) {
                finishMessage(opcode: message.opcode, &state, reply: nil)
            } else {
                finishMessage(opcode: message.opcode, &state, reply: 0)
                state.reenumerateWhenDrained = true
            }
        default:
            finishMessage(opcode: message.opcode, &state, reply: 0)
        }
    }

    private func finishMessage(opcode: UInt32, _ state: inout SimulatorState, reply: UInt32?) {
        state.record.rcmMessages.append((opcode, state.transferSizes))
        state.incoming = []
        state.transferSizes = []
        if let reply {
            state.outgoing.append([UInt8(reply & 0xFF), UInt8(reply >> 8 & 0xFF), UInt8(reply >> 16 & 0xFF), UInt8(reply >> 24)])
        }
    }
}

extension Array where Element == UInt8 {
    func loadWord(_ offset: Int) -> UInt32 {
        UInt32(self[offset]) | UInt32(self[offset + 1]) << 8 | UInt32(self[offset + 2]) << 16 | UInt32(self[offset + 3]) << 24
    }
}
