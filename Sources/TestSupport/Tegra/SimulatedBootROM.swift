import Tegra

/// The boot ROM's half: RCM messages in 4096-byte pieces, checked, answered.
extension SimulatedTegra {
    /// What the simulated ROM answers to a message it rejects (the real code is not documented).
    public static let rejectionWord: UInt32 = 0x0000_0003

    func bootROMReceive(_ bytes: [UInt8], _ state: inout SimulatorState) throws {
        state.incoming += bytes
        state.transferSizes.append(bytes.count)
        guard state.incoming.count >= 4 else { return }
        let total = Int(simulatorWord(state.incoming, 0))
        guard total >= 1024 + 4, total <= 4 << 20 else {
            // Not an RCM message (an nv3p packet starts with its version, 1): a host checking
            // whether the miniloader runs. The ROM refuses it with one reply word.
            state.record.nonRCMInBootROM += 1
            state.incoming = []
            state.transferSizes = []
            state.outgoing.append(simulatorBytes(Self.rejectionWord))
            return
        }
        if state.incoming.count >= spec.opcodeOffset + 4, simulatorWord(state.incoming, spec.opcodeOffset) == 0x4,
           let limit = disconnectLimit(.miniloaderUpload, &state), state.incoming.count >= limit {
            unplug(&state, at: .miniloaderUpload)
            throw TegraError(.deviceGone, "simulated device unplugged during the miniloader upload")
        }
        if state.incoming.count < total {
            if bytes.count != SimulatedTegra.maxTransfer {
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
            message = try ReceivedRCMMessage(checking: state.incoming, spec: spec, cmacKeyIsZero: !has(.secureBoot))
        } catch let violation as SimulatorViolation {
            if !(violation.isSignatureFailure && has(.secureBoot)) {
                state.record.violations.append(violation.description)
            }
            finishMessage(opcode: simulatorWord(state.incoming, spec.opcodeOffset), &state, reply: Self.rejectionWord)
            return
        }
        switch message.opcode {
        case 0x6:
            finishMessage(opcode: message.opcode, &state,
                          reply: has(.silentAt(.rcmVersionReply)) ? nil : spec.rcmVersionWord)
        case 0x4:
            state.record.miniloader = message.payload
            state.record.miniloaderEntry = message.args[0]
            guard message.args[0] == spec.miniloaderEntry else {
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
        if let reply { state.outgoing.append(simulatorBytes(reply)) }
    }
}
