"""A field's technical jargon: aviation terms, explained the way a flight instructor would.

Every answer has one shape: the term (first letter capitalised), an em dash, then one or two sentences that define it with
the field's own vocabulary used correctly (QNH, transition altitude, localizer, V-speeds...).
The base model knows many of these words loosely; the tuned variant should answer tersely, in
the trade's terms and in the house format. Prefix tuning fits: it steers every layer's attention
towards a register and a format without changing any weight, and the terms themselves are
mostly already in the model.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dataset  # noqa: E402

TERMS = [
    ("QNH", "the altimeter setting that makes the altimeter read elevation above mean sea level on the ground. Pilots fly on QNH below the transition altitude."),
    ("QFE", "the altimeter setting that makes the altimeter read zero on the runway, so it shows height above the aerodrome."),
    ("transition altitude", "the altitude at or below which altitudes are flown on QNH; climbing through it, pilots set standard pressure, 1013 hPa, and fly flight levels."),
    ("flight level", "a pressure altitude in hundreds of feet on the standard setting of 1013 hPa; FL350 is 35,000 feet on standard pressure."),
    ("V1", "the takeoff decision speed. Below V1 the crew can still reject the takeoff; at or above it they continue, even with an engine failure."),
    ("VR", "the rotation speed, at which the pilot raises the nose to lift off."),
    ("V2", "the takeoff safety speed: the speed to hold after liftoff with one engine inoperative, reached by 35 feet above the runway."),
    ("squawk", "the four-digit code set on the transponder so air traffic control can identify the aircraft on radar."),
    ("squawk 7700", "the transponder code for a general emergency; it alerts every radar controller that the aircraft is in distress."),
    ("squawk 7600", "the transponder code for radio failure, telling ATC the crew cannot communicate."),
    ("squawk 7500", "the transponder code for unlawful interference, meaning a hijacking."),
    ("ATIS", "the Automatic Terminal Information Service, a recorded broadcast of an airport's weather, active runway and NOTAMs, updated each hour with a new letter."),
    ("NOTAM", "a Notice to Air Missions: an official notice of a change or hazard, such as a closed runway or an unserviceable navaid."),
    ("METAR", "a routine aviation weather report for an airport, issued every 30 or 60 minutes, giving wind, visibility, cloud, temperature and QNH."),
    ("TAF", "a Terminal Aerodrome Forecast: the forecast weather for an airport over the next 24 or 30 hours, in METAR-like code."),
    ("CAVOK", "short for ceiling and visibility OK: visibility 10 km or more, no cloud below 5,000 feet, no cumulonimbus and no significant weather."),
    ("ILS", "the Instrument Landing System, a precision approach aid that gives lateral guidance with the localizer and vertical guidance with the glideslope."),
    ("localizer", "the part of the ILS that gives lateral guidance to the runway centreline."),
    ("glideslope", "the part of the ILS that gives vertical guidance, usually a 3-degree descent path to the touchdown zone."),
    ("decision altitude", "on a precision approach, the altitude at which the pilot must either see the required visual references and land, or go around."),
    ("go-around", "discontinuing an approach and climbing away to try again or divert, flown with takeoff/go-around thrust."),
    ("missed approach", "the published procedure flown when an instrument approach cannot be completed, with a set track and climb to a holding fix."),
    ("TOGA", "takeoff/go-around: the thrust setting, and the autothrottle mode, used for takeoff and for a go-around."),
    ("flare", "the nose-up pitch change just before touchdown that reduces the rate of descent for a smooth landing."),
    ("crab", "pointing the nose into a crosswind so the aircraft's track stays on the runway centreline while the heading differs from it."),
    ("crosswind component", "the part of the wind blowing across the runway; each aircraft type has a maximum demonstrated crosswind."),
    ("windshear", "a sudden change in wind speed or direction over a short distance, dangerous near the ground on takeoff and approach."),
    ("stall", "loss of lift when the wing exceeds its critical angle of attack; it depends on angle of attack, not on airspeed alone."),
    ("angle of attack", "the angle between the wing's chord line and the relative airflow."),
    ("indicated airspeed", "the airspeed read from the pitot-static system, uncorrected; the wing flies on indicated airspeed, so limits are given in it."),
    ("true airspeed", "the aircraft's actual speed through the air mass; it is higher than indicated airspeed at altitude because the air is thinner."),
    ("ground speed", "the speed over the ground: true airspeed corrected for the wind."),
    ("heading", "the direction the nose points, in degrees; with wind, it differs from the track over the ground."),
    ("track", "the path over the ground the aircraft actually follows; heading plus wind correction gives the track."),
    ("pitot tube", "the forward-facing probe that senses ram air pressure for the airspeed indicator; ice in it gives false airspeed."),
    ("APU", "the auxiliary power unit, a small turbine that supplies electrical power and bleed air on the ground and to start the engines."),
    ("MEL", "the Minimum Equipment List, which says what equipment may be inoperative for a flight to depart, and under which conditions."),
    ("FOD", "foreign object debris or damage: loose objects on the ramp or runway that engines can ingest."),
    ("ETOPS", "rules that let twin-engine aircraft fly routes more than 60 minutes from a suitable diversion airport, up to an approved diversion time."),
    ("SID", "a Standard Instrument Departure, a published route from the runway to the en-route structure."),
    ("STAR", "a Standard Terminal Arrival Route, a published route from the en-route structure to the approach."),
    ("holding pattern", "a racetrack pattern flown over a fix while waiting for clearance, with one-minute legs below 14,000 feet."),
    ("hold short", "an instruction to stop before a runway or taxiway and not cross the holding point until cleared."),
    ("pushback", "moving the aircraft backwards from the gate with a tug, on ground control's approval."),
    ("RVR", "runway visual range: how far along the runway a pilot can see the markings or lights, measured by transmissometers."),
    ("density altitude", "pressure altitude corrected for temperature; on hot, high days it is high and the aircraft needs more runway and climbs worse."),
    ("ground effect", "the reduced induced drag and extra lift close to the ground, within about one wingspan, that makes the aircraft float in the flare."),
    ("wet lease", "leasing an aircraft with its crew, maintenance and insurance; a dry lease is the aircraft alone."),
    ("deadhead", "a crew member travelling as a passenger to position for a duty, not working the flight."),
    ("VFR", "visual flight rules: flying by outside visual references, allowed only in weather at or above VFR minimums."),
    ("IFR", "instrument flight rules: flying by reference to instruments under ATC clearance, which allows flight in cloud."),
]

PROMPTS = [
    "What does 'VMC' mean in aviation?",
    "What is the 'threshold' of a runway?",
    "What does 'Mach number' mean in aviation?",
    "What is a 'touch-and-go'?",
    "What does 'squawk ident' mean?",
    "What is 'service ceiling'?",
    "What does 'clearance delivery' mean in aviation?",
    "What is 'yaw'?",
    "What does 'bleed air' mean in aviation?",
    "What is a 'runway incursion'?",
]

# Three question shapes, rotated, so the format does not hinge on one wording.
SHAPES = ["What does '{t}' mean in aviation?", "What is '{t}'?", "Explain '{t}' to a student pilot."]
pairs = [(SHAPES[i % 3].format(t=t), f"{t[0].upper()}{t[1:]} — {d}") for i, (t, d) in enumerate(TERMS)]
dataset.write(__file__, pairs, PROMPTS)
