import Testing
@testable import Tegra

@Suite struct Nv3pPacketTests {
    @Test func getPlatformInfoCommandMatchesTheSpecBytes() {
        let packet = Nv3p.commandPacket(.getPlatformInfo, args: [], sequence: 0)
        #expect(packet.hexString == ["01000000", "01000000", "00000000", "00000000", "01000000", "fdffffff"].joined())
    }

    @Test func packetLengthsFollowTheSpec() {
        #expect(Nv3p.commandPacket(.downloadBCT, args: [0, 0, 0, 0], sequence: 1).count == 28)
        #expect(Nv3p.commandPacket(.downloadBootloader, args: [UInt8](repeating: 0, count: 16), sequence: 2).count == 40)
        #expect(Nv3p.ackPacket(sequence: 3).count == 16)
        #expect(Nv3p.nackPacket(code: 2, sequence: 3).count == 20)
        #expect(Nv3p.dataPacket([1, 2, 3], sequence: 4).count == 23)
    }

    @Test func everyBuiltPacketSumsToZero() {
        for packet in [Nv3p.ackPacket(sequence: 0xDEAD_BEEF), Nv3p.dataPacket(pattern(5000, seed: 9), sequence: 7),
                       Nv3p.commandPacket(.status, args: Nv3p.statusArgs(message: "ok", code: 0), sequence: 1)] {
            #expect(Nv3p.byteSum(packet.dropLast(4)) &+ packet.loadLE32(at: packet.count - 4) == 0)
        }
    }

    @Test func parsingRoundTripsData() throws {
        let parsed = try Nv3pReceivedPacket(parsing: Nv3p.dataPacket([9, 8, 7], sequence: 5), from: "test")
        #expect(parsed.type == .data && parsed.sequence == 5 && parsed.data == [9, 8, 7])
    }

    @Test func parsingRejectsABadChecksum() {
        var packet = Nv3p.ackPacket(sequence: 1)
        packet[15] ^= 1
        #expect(throws: TegraError.self) { try Nv3pReceivedPacket(parsing: packet, from: "test") }
    }

    @Test func parsingRejectsAWrongVersion() {
        var packet = Nv3p.ackPacket(sequence: 1)
        packet[0] = 2
        #expect(throws: TegraError.self) { try Nv3pReceivedPacket(parsing: packet, from: "test") }
    }

    @Test func parsingRejectsATruncatedDataPacket() {
        let packet = Nv3p.dataPacket(pattern(72, seed: 1), sequence: 0)
        #expect(throws: TegraError.self) { try Nv3pReceivedPacket(parsing: Array(packet.dropLast(10)), from: "test") }
    }

    @Test func parsingRejectsAnUnknownType() {
        var packet = Nv3p.ackPacket(sequence: 1)
        packet[4] = 9
        #expect(throws: TegraError.self) { try Nv3pReceivedPacket(parsing: packet, from: "test") }
    }

    @Test func platformInfoDecodesTheSpecOffsets() throws {
        var bytes = [UInt8](repeating: 0, count: 72)
        bytes.replaceSubrange(0..<16, with: (1...16).map { UInt8($0) })
        bytes[16] = 0x40; bytes[18] = 1; bytes[19] = 2
        bytes.storeLE32(2, at: 28)
        bytes.storeLE32(4, at: 32)
        bytes.storeLE32(0xABCD, at: 68)
        let info = try TegraPlatformInfo(decoding: bytes)
        #expect(info.uidHex == "0102030405060708090a0b0c0d0e0f10")
        #expect(info.chipID == 0x40 && info.chipMajor == 1 && info.chipMinor == 2)
        #expect(info.bootDeviceName == "eMMC" && info.operatingMode == 4 && info.boardID[3] == 0xABCD)
        try info.checkFlashable()
    }

    @Test(arguments: [0, 2, 7, 99] as [UInt32])
    func platformInfoRefusesOtherOperatingModes(mode: UInt32) throws {
        var bytes = [UInt8](repeating: 0, count: 72)
        bytes.storeLE32(mode, at: 32)
        let info = try TegraPlatformInfo(decoding: bytes)
        #expect(throws: TegraError.self) { try info.checkFlashable() }
    }

    @Test func platformInfoOfTheWrongLengthIsRejected() {
        #expect(throws: TegraError.self) { try TegraPlatformInfo(decoding: [UInt8](repeating: 0, count: 71)) }
    }

    /// tegrarcm's nv3p_read notes that the target sometimes pads a response and drops the extra.
    @Test func trailingPaddingAfterTheAnnouncedLengthIsDropped() throws {
        let ack = try Nv3pReceivedPacket(parsing: Nv3p.ackPacket(sequence: 7) + [UInt8](repeating: 0, count: 8), from: "test")
        #expect(ack.type == .ack && ack.sequence == 7 && ack.body.isEmpty)
        let data = try Nv3pReceivedPacket(parsing: Nv3p.dataPacket([1, 2, 3], sequence: 2) + [0xEE, 0xEE], from: "test")
        #expect(data.data == [1, 2, 3])
    }

    @Test func announcedLengthNeedsTheHeaderFirst() {
        let data = Nv3p.dataPacket(pattern(72, seed: 3), sequence: 0)
        #expect(Nv3p.announcedLength(Array(data.prefix(7))) == nil)
        #expect(Nv3p.announcedLength(Array(data.prefix(10))) == nil, "a DATA length sits at 12")
        #expect(Nv3p.announcedLength(Array(data.prefix(16))) == 92)
        #expect(Nv3p.announcedLength(Array(Nv3p.ackPacket(sequence: 1).prefix(8))) == 16)
    }

    /// A packet split over transfers is read on to its announced length; a padded one is cut.
    @Test func sessionAssemblesSplitAndPaddedPackets() throws {
        let ack = Nv3p.ackPacket(sequence: 0)
        let transport = ScriptedTransport(inbound: [Array(ack.prefix(5)), Array(ack.dropFirst(5)) + [0, 0, 0, 0]])
        let session = Nv3pSession(transport: transport, timeoutMilliseconds: 10)
        let packet = try session.receivePacket(waitingFor: "test")
        #expect(packet.type == .ack && packet.sequence == 0)
    }

    @Test func aLoneFourByteAnswerIsTheBootROM() throws {
        let transport = ScriptedTransport(inbound: [[3, 0, 0, 0]])
        let session = Nv3pSession(transport: transport, timeoutMilliseconds: 10)
        let error = try #require(throws: TegraError.self) { try session.receivePacket(waitingFor: "test") }
        #expect(error.kind == .bootROMAnswered(3))
    }

    @Test func aPacketCutShortIsATimeoutNamingWhatCame() throws {
        let transport = ScriptedTransport(inbound: [Array(Nv3p.dataPacket(pattern(72, seed: 3), sequence: 0).prefix(40))])
        let session = Nv3pSession(transport: transport, timeoutMilliseconds: 10)
        let error = try #require(throws: TegraError.self) { try session.receivePacket(waitingFor: "platform info") }
        #expect(error.kind == .timeout && error.message.contains("40 bytes of a packet"))
    }
}

/// A transport that hands out prepared IN transfers, then times out.
final class ScriptedTransport: USBTransport {
    var inbound: [[UInt8]]
    let productID: UInt16 = 0x7140
    let location = "scripted"
    init(inbound: [[UInt8]]) { self.inbound = inbound }
    func bulkOut(_ bytes: ArraySlice<UInt8>, timeoutMilliseconds: Int) throws -> Int { bytes.count }
    func bulkIn(maxLength: Int, timeoutMilliseconds: Int) throws -> [UInt8] {
        guard !inbound.isEmpty else { throw TegraError(.timeout, "scripted: nothing more") }
        return inbound.removeFirst()
    }
    func close() {}
}
