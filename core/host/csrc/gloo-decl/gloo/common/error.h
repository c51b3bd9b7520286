// Declaration stub: see README.md.
#pragma once
