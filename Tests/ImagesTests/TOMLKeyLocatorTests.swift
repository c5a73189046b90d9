import Station
import Testing

/// The key locator maps key paths to the lines a person would edit.
struct TOMLKeyLocatorTests {
    static let station = """
        # station config
        [station]
        allow_loop_devices = false
        max_device_size = "512GiB"

        [profiles.demo]
        image = "/srv/images/demo.img.zst"
        verify = true

        [profiles."lab board".image]
        file = "x.img"

        [[slots]]
        name = "A1"
        match = "pci-*-usb-0:1.1:1.0-scsi-0:0:0:0"

        [[slots]]
        name = "A2"   # a comment with key = value
        match = '''
        [not.a.header]
        fake = "key"
        '''
        [slots.options]
        speed = 1

        [[slots.blobs]]
        file = "a"
        [[slots]]
        name = "A3"
        inline = { a = 1, b.c = [1, { d = 2 }] }
        multi = [
          "x",
          { name = "y" },
        ]
        after = 1
        """

    let locator = TOMLKeyLocator(source: station)

    @Test func locatesTablesKeysAndImplicitParents() {
        #expect(locator.line(of: "station") == 2)
        #expect(locator.line(of: "station.max_device_size") == 4)
        #expect(locator.line(of: "profiles") == 6)
        #expect(locator.line(of: "profiles.demo") == 6)
        #expect(locator.line(of: "profiles.demo.verify") == 8)
        #expect(locator.line(of: "profiles.\"lab board\".image.file") == 11)
    }

    @Test func numbersArraysOfTablesAndNestsUnderTheLatestElement() {
        #expect(locator.line(of: "slots[0]") == 13)
        #expect(locator.line(of: "slots[0].match") == 15)
        #expect(locator.line(of: "slots[1].name") == 18)
        #expect(locator.line(of: "slots[1].options.speed") == 24)
        #expect(locator.line(of: "slots[1].blobs[0].file") == 27)
        #expect(locator.line(of: "slots[2].name") == 29)
    }

    @Test func skipsMultiLineStringsAndComments() {
        #expect(locator.line(of: "slots[1].match") == 19)
        #expect(locator.line(of: "not.a.header") == nil)
        #expect(locator.line(of: "slots[1].fake") == nil)
        #expect(locator.line(of: "key") == nil)
    }

    @Test func locatesKeysInsideInlineTablesAndArrays() {
        #expect(locator.line(of: "slots[2].inline.a") == 30)
        #expect(locator.line(of: "slots[2].inline.b.c[1].d") == 30)
        #expect(locator.line(of: "slots[2].multi[1].name") == 33)
        #expect(locator.line(of: "slots[2].after") == 35)
    }

    @Test func nearestLineFallsBackToTheEnclosingTable() {
        #expect(locator.line(of: "profiles.demo.bmap") == nil)
        #expect(locator.nearestLine(of: "profiles.demo.bmap") == 6)
        #expect(locator.nearestLine(of: "slots[2].missing") == 28)
        #expect(locator.nearestLine(of: "nothing.at.all") == nil)
    }

    @Test func pathsRoundTripThroughSegments() {
        let segments = TOMLKeyLocator.segments(of: "profiles.\"my.board\".users[3].name")
        #expect(segments == [.key("profiles"), .key("my.board"), .key("users"), .index(3), .key("name")])
        #expect(TOMLKeyLocator.format(segments) == "profiles.\"my.board\".users[3].name")
    }

    @Test func toleratesTextThatIsNotTOML() {
        let broken = TOMLKeyLocator(source: "[unclosed\n= value\n\"open string\nkey = 1\n[[\n")
        #expect(broken.line(of: "unclosed.key") == 4)
    }
}
